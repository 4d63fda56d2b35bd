#!/usr/bin/env bash
# Every GPU measurement of issue #21 in one go, in under 8 minutes of wall time:
#
#   1. ReFL step, SD1.5 512 px: batch sweep 1,2,4,8,16 (toolkit, fast, reference-style loop)
#   2. ReFL step, SDXL 1024 px: batch 1 (+2 if the budget allows), with the memory switches
#      (peak <= 24 GiB at batch 1?) and the reference-style loop
#   3. DDPO / GRPO rollouts (50 DDIM steps, eta 1, CFG 5, log-probs): batch sweep
#   4. D3PO rollouts (20 DDIM steps): batch sweep
#   (before them, on CUDA: `pytest -m gpu tests/test_sampling.py`, the loop without host syncs)
#
# Each writes its JSON to $RESULTS_DIR (default bench/results/) as <bench>_<what>-<device>.json,
# row by row, so a step cut short by its time limit keeps what it measured. The environment is
# printed first and a Markdown table of every JSON last. Exit status: 0, or 1 when any step
# crashed, hit its time limit or recorded an error row (the other steps still run).
#
#   bash bench/gpu_campaign.sh            # on a GPU machine, repo root, .venv present
#   CPU=1 bash bench/gpu_campaign.sh      # the same script on tiny models on the CPU (~1 min; pytest -m slow runs it)
#   DRY_RUN=1 bash bench/gpu_campaign.sh  # print the measurement commands instead of running them
#
# Knobs (environment): PYTHON, RESULTS_DIR, DEADLINE_S (whole run, default 465), SD15_BUDGET_S,
# SDXL_BUDGET_S, DDPO_BUDGET_S, D3PO_BUDGET_S, TIMED, SDXL_TIMED, WARMUP, SWITCHES, SD15_CONFIGS, SDXL_CONFIGS.
# Each sweep shares its budget evenly between its configs and starts a batch size only when
# twice the previous one's cost is left, so slow cells leave the larger batch sizes unmeasured
# (recorded as skipped); SD15_CONFIGS=fast,reference (or a larger SD15_BUDGET_S) gives them room.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
DEADLINE_S=${DEADLINE_S:-465}
mkdir -p "$RESULTS_DIR"

if [[ "${CPU:-0}" == "1" ]]; then
  DEVICE=cpu
  COMMON=(--model tiny --device cpu --warmup "${WARMUP:-0}" --timed "${TIMED:-1}" --matmul-n 256 --sampling-steps 4)
  REFL_EXTRA=(--stop-step 2)
  SD15_BATCHES=1,2; SDXL_BATCHES=1; ROLLOUT_BATCHES=1,2
  SWITCHES=${SWITCHES:-channels_last}
  SDXL_TIMED=${SDXL_TIMED:-1}
  DDPO_STEPS=(); D3PO_STEPS=()   # --sampling-steps 4 from COMMON
else
  DEVICE=cuda
  COMMON=(--model full --device cuda --warmup "${WARMUP:-1}" --timed "${TIMED:-10}")
  REFL_EXTRA=()
  SD15_BATCHES=1,2,4,8,16; SDXL_BATCHES=1,2; ROLLOUT_BATCHES=1,2,4,8,16
  SWITCHES=${SWITCHES:-compile,channels_last,fuse_qkv,cache_text_embeddings}
  # SDXL ReFL runs ~10 s a step at batch 1: 5 timed steps keep both configs inside the budget
  SDXL_TIMED=${SDXL_TIMED:-5}
  DDPO_STEPS=(--sampling-steps 50); D3PO_STEPS=(--sampling-steps 20)
fi
SDXL_CONFIGS=${SDXL_CONFIGS:-lowmem,reference+mem}
# SD1.5: the uncompiled toolkit first (a compiled config borrows its FLOP count)
SD15_CONFIGS=${SD15_CONFIGS:-toolkit,fast,reference}

echo "== environment"
TAG=$("$PY" - "$DEVICE" <<'EOF'
import platform, sys
sys.path.insert(0, "bench")
import torch, diffusers, transformers, peft
import gpu_sweep
dev = sys.argv[1]
say = lambda s: print(s, file=sys.stderr, flush=True)  # stdout carries the device tag only
say(f"python {platform.python_version()}  torch {torch.__version__}  diffusers {diffusers.__version__}  "
    f"transformers {transformers.__version__}  peft {peft.__version__}")
if dev == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_campaign.sh: no CUDA device (CPU=1 runs the tiny CPU mode)")
    p = torch.cuda.get_device_properties(0)
    say(f"gpu {torch.cuda.get_device_name(0)}  {p.total_memory / 2**30:.0f} GiB  cuda {torch.version.cuda}  cudnn {torch.backends.cudnn.version()}")
else:
    say(f"cpu {platform.machine()}  threads {torch.get_num_threads()}")
try:
    import vfeedback.models.speed  # noqa: F401
    say("vfeedback.models.speed: present")
except ImportError:
    say("vfeedback.models.speed: absent (the fast configs are recorded as skipped)")
print(gpu_sweep.device_tag(dev))
EOF
)
if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
fi
[[ "$DEVICE" == cpu ]] && TAG="$TAG-tiny"
echo "device tag: $TAG"

failed=()
outputs=()
# run NAME BUDGET_S OUT_JSON -- python args...: one measurement under a hard time limit (what is
# left of DEADLINE_S); its failure is recorded, not fatal
run() {
  local name=$1 budget=$2 out=$3
  shift 4
  local left=$((DEADLINE_S - SECONDS))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s left of the ${DEADLINE_S}s deadline"
    failed+=("$name (no time left)")
    return 0
  fi
  local limit=$((budget + 60 < left ? budget + 60 : left))
  echo "== $name (budget ${budget}s, hard limit ${limit}s, ${left}s left)"
  local rc=0
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf 'DRY_RUN:'; printf ' %q' "$PY" "$@" --budget-s "$budget" --out "$out"; printf '\n'
    return 0
  fi
  rm -f "$out"  # a file left by an earlier campaign must not pass for this one's
  timeout -k 10 "$limit" "$PY" "$@" --budget-s "$budget" --out "$out" || rc=$?
  [[ -f "$out" ]] && outputs+=("$out")
  if ((rc != 0)); then
    echo "== $name: exit status $rc$( ((rc == 124)) && echo ' (time limit)')"
    failed+=("$name (exit $rc)")
  fi
  return 0
}

# the gpu-marked checks first (tiny models, seconds): the sampling loop under
# torch.cuda.set_sync_debug_mode("error") (tests/test_sampling.py)
if [[ "$DEVICE" == cuda ]]; then
  echo "== gpu tests (pytest -m gpu)"
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "DRY_RUN: $PY -m pytest -q -m gpu tests/test_sampling.py"
  else
    timeout -k 10 90 "$PY" -m pytest -q -m gpu tests/test_sampling.py || failed+=("gpu tests")
  fi
fi

run "ReFL SD1.5 sweep" "${SD15_BUDGET_S:-140}" "$RESULTS_DIR/refl_step_full_sd15-$TAG.json" -- \
  bench/refl_step.py --full sd15 --batches "$SD15_BATCHES" --configs "$SD15_CONFIGS" --switches "$SWITCHES" "${COMMON[@]}" "${REFL_EXTRA[@]}"
run "ReFL SDXL batch 1 (+2)" "${SDXL_BUDGET_S:-130}" "$RESULTS_DIR/refl_step_full_sdxl-$TAG.json" -- \
  bench/refl_step.py --full sdxl --batches "$SDXL_BATCHES" --configs "$SDXL_CONFIGS" --switches "$SWITCHES" \
  "${COMMON[@]}" --timed "$SDXL_TIMED" "${REFL_EXTRA[@]}"
run "DDPO/GRPO rollout sweep" "${DDPO_BUDGET_S:-70}" "$RESULTS_DIR/rollout_step_ddpo-$TAG.json" -- \
  bench/rollout_step.py --family sd15 --batches "$ROLLOUT_BATCHES" --switches "$SWITCHES" "${COMMON[@]}" "${DDPO_STEPS[@]}"
run "D3PO rollout sweep" "${D3PO_BUDGET_S:-35}" "$RESULTS_DIR/rollout_step_d3po-$TAG.json" -- \
  bench/rollout_step.py --family sd15 --batches "$ROLLOUT_BATCHES" --switches "$SWITCHES" "${COMMON[@]}" "${D3PO_STEPS[@]}"

echo
echo "== summary (${SECONDS}s)"
if ((${#outputs[@]})); then
  "$PY" bench/refl_step.py --table "${outputs[@]}" || failed+=("summary tables")
fi
if ((${#failed[@]})); then
  echo
  echo "== failed: ${failed[*]}"
  exit 1
fi
echo "== all measurements ran"
