# Two entry points for a fresh machine: `make quickstart` (the main job) and `make test`.
# Both create or reuse .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# torch: the CPU-capable build pip finds on this machine's disk; a CUDA machine may override.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,face,llm,robot,demo,data

.PHONY: venv quickstart test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	@if [ -e runs/quickstart ]; then echo "runs/quickstart holds an earlier quickstart: open it, or 'make clean' (deletes it) and 'make quickstart' to run it again" >&2; exit 2; fi
	$(BIN)/vfeedback train configs/quickstart.yaml

test: $(STAMP) bubblewrap
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf runs/quickstart

# The renderer boundary (docs/integrations.md): bubblewrap from apt when missing and we are root
# (best effort: without it untrusted renderings are refused and the boundary tests skip).
.PHONY: bubblewrap
bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || \
	  echo "bubblewrap not installed: untrusted renderings will be refused (apt-get install bubblewrap)"; }

# The shapes world (docs/world.md): judges, tiny:shapes and its base rate, from scratch on one
# CPU thread in about 85 minutes (wall-clock budgets per stage); writes rewards/assets/shapes and
# vfeedback/assets/tiny-shapes (--model-dir / --judge-dir / --work-dir build elsewhere).
.PHONY: world
world: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m vfeedback.world.train_world

# The ranking demo on tiny:shapes (docs/rank_app.md): ZO-RankSGD refines one image of a caption
# from your clicks, and the image changes every line-search round (the mode where a person sees
# change soonest; configs/rank/shapes-d3po.yaml is the D3PO one, with the probe panel). Answers
# are saved in runs/rank-shapes-zo/feedback.sqlite (stop and run again to resume).
.PHONY: demo
demo: $(STAMP)
	@echo "vfeedback rank demo: open http://127.0.0.1:7860 once the model has loaded (Ctrl-C stops; every answer is kept)"
	$(BIN)/vfeedback rank configs/rank/shapes-zo.yaml

# The measured figures of README.md / docs/ that are cheap on CPU, rerun from their commands and
# checked against the committed JSON under bench/results/figures/ (bench/reproduce.py); fails,
# naming the figure and the value, when one falls outside the noise band stated with it.
.PHONY: reproduce
reproduce: $(STAMP)
	PYTHONPATH=. $(BIN)/python bench/reproduce.py

# Mutation testing of the core math against its fast tests (mutmut; scope in tests/mutants.py,
# settings in pyproject.toml [tool.mutmut]); prints every survivor and the kill rate.
.PHONY: mutants
mutants: $(STAMP)
	$(BIN)/python tests/mutants.py

# The image-reward package (THUDM/ImageReward) in an environment of its own, .venv-ir: it pins
# timm==0.6.13 and needs transformers 4.x, which vfeedback's pins exclude. For
# bench/imagereward_reference.py (the recorded reference scores that tests/test_imagereward_reference.py
# checks rewards/imagereward.py against) and that file's slow live test. Minutes; not part of `make test`.
IR_VENV ?= .venv-ir
.PHONY: imagereward-ref-venv
imagereward-ref-venv: $(IR_VENV)/.installed-$(shell cat bench/imagereward_ref_requirements.txt | cksum | cut -d' ' -f1)
$(IR_VENV)/.installed-%: bench/imagereward_ref_requirements.txt
	test -x $(IR_VENV)/bin/python || $(PY) -m venv $(IR_VENV)
	$(IR_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(IR_VENV)/bin/python -m pip install -q -r bench/imagereward_ref_requirements.txt
	$(IR_VENV)/bin/python -m pip install -q --no-deps setuptools==69.5.1
	rm -f $(IR_VENV)/.installed-*
	touch $@
