"""Property-based checks of the input boundary (Hypothesis).

Configs are made by mutating the shipped tiny ones: wrong types, non-finite and out-of-range
numbers, empty and huge values, unknown and deleted keys, duplicate keys and aliases in the YAML
text. For every one, ``validate`` and ``train --dry-run`` (in this process) must agree, exit 0
or 2, print no traceback and leave nothing behind. CLI argument lists of ``score`` and
``sample`` are generated the same way. Example counts are bounded to keep the suite fast;
``HYPOTHESIS_EXAMPLES=500`` runs more.
"""
import contextlib
import copy
import math
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfeedback.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["configs/refl/tiny.yaml", "configs/d3po/tiny.yaml", "configs/zo_ranksgd/tiny.yaml"]
BASES = {name: yaml.safe_load((ROOT / name).read_text()) for name in SHIPPED}
N = int(os.environ.get("HYPOTHESIS_EXAMPLES", "0"))
COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])

# fields worth hitting even when a shipped config leaves them at their default
EXTRA_FIELDS = ["seed", "refl.margin", "refl.grad_scale", "model.lora.alpha", "model.lora.target_modules", "model.lora.dropout",
                "sampling.guidance_scale", "sampling.eta", "sampling.steps", "train.adam_betas", "train.device", "train.lr",
                "train.mixed_precision", "prompts.eval_seeds", "prompts.eval", "eval_rewards", "reward.normalize", "output_dir",
                "model.resolution", "model.attention", "log.trackers", "d3po.group_size", "zo_ranksgd.num_candidates"]

values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1.0, 1e300]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 2**32 - 1, 2**32, 2**63, 10**9]),
    st.text(max_size=12),
    st.sampled_from(["", " ", "x" * 5000, "cpu", "cuda", "cuda:7", "gpu", "to_zz", "tiny:sd99", "tiny:sdxl", "/", ".", "~",
                     "fp16", "xformers", "nan", "1e999", "color", "brightness"]),
    st.lists(st.sampled_from([0, -1, 2**40, "to_q", "to_zz", "", 1.5, None]), max_size=3),
    st.sampled_from([[], {}, None, True, False, [[]], {"name": "beauty"}, [{"name": "brightness"}], [{"name": "color", "weight": math.nan}]]),
)


def _paths(d, prefix=""):
    out = []
    for k, v in d.items():
        p = f"{prefix}{k}"
        out.append(p)
        if isinstance(v, dict):
            out += _paths(v, p + ".")
    return out


def _set(d, path, value):
    *head, last = path.split(".")
    for h in head:
        if not isinstance(d.get(h), dict):
            d[h] = {}
        d = d[h]
    d[last] = value


def _delete(d, path):
    *head, last = path.split(".")
    for h in head:
        d = d.get(h)
        if not isinstance(d, dict):
            return
    d.pop(last, None)


@st.composite
def mutated_config(draw):
    """(name, YAML text): a shipped config with 1-3 mutations, dumped, sometimes with a
    duplicate key or an alias in the text."""
    name = draw(st.sampled_from(SHIPPED))
    cfg = copy.deepcopy(BASES[name])
    cfg["log"] = {**cfg.get("log", {}), "trackers": []}
    cfg["output_dir"] = "OUT"  # replaced with a fresh path per example
    fields = sorted(set(_paths(cfg) + EXTRA_FIELDS))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
        path = draw(st.sampled_from(fields))
        if op == "set":
            _set(cfg, path, draw(values))
        elif op == "delete":
            _delete(cfg, path)
        else:
            _set(cfg, path.rsplit(".", 1)[0] + ".bogus_key" if "." in path else "bogus_key", 1)
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    extra = draw(st.sampled_from(["", "", "", "dup", "alias"]))
    if extra == "dup":
        text += "seed: 1\nseed: 2\n"
    elif extra == "alias":
        text += "x_anchor: &a [1, 2]\nx_alias: [*a, *a]\n"
    return name, text


@contextlib.contextmanager
def sandbox():
    with tempfile.TemporaryDirectory(prefix="vf-prop-") as d:
        old = os.getcwd()
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(old)


def run(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: a flag of the wrong type (usage line, exit 2)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out + err


@settings(max_examples=N or 25, **COMMON)
@given(mutated_config())
def test_validate_and_dry_run_agree(capsys, case):
    name, text = case
    with sandbox() as d:
        out = d / "run"
        text = text.replace("output_dir: OUT", f"output_dir: {out}")
        (d / "c.yaml").write_text(text, encoding="utf-8")
        before = sorted(p.name for p in d.iterdir())
        rc_v, msg_v = run(capsys, ["validate", "c.yaml"])
        rc_d, msg_d = run(capsys, ["train", "c.yaml", "--dry-run"])
        assert "Traceback" not in msg_v + msg_d
        assert rc_v in (0, 2) and rc_d in (0, 2), (rc_v, msg_v[-800:], rc_d, msg_d[-800:])
        assert rc_v == rc_d, f"validate {rc_v} but train --dry-run {rc_d}:\n{msg_v[-800:]}\n---\n{msg_d[-800:]}\n---\n{text}"
        if rc_v == 2:  # the same first problem, in words
            assert msg_v.strip().splitlines()[0] == msg_d.strip().splitlines()[0] or "problem(s)" in msg_v
        assert sorted(p.name for p in d.iterdir()) == before, "a check left something behind"
        assert not out.exists()


def test_every_shipped_tiny_config_passes_both(capsys):
    with sandbox() as d:
        for name in SHIPPED:
            cfg = copy.deepcopy(BASES[name])
            cfg["output_dir"] = str(d / "run")
            (d / "c.yaml").write_text(yaml.safe_dump(cfg))
            rc_v, msg_v = run(capsys, ["validate", "c.yaml"])
            rc_d, msg_d = run(capsys, ["train", "c.yaml", "--dry-run"])
            assert (rc_v, rc_d) == (0, 0), (name, msg_v, msg_d)
            assert "nothing written" in msg_d
            assert not (d / "run").exists()


flag_values = st.one_of(st.integers(-(2**40), 2**40).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "", "1e999", "cpu", "cuda", "cuda:9", "gpu",
                                         "0,1", "0,-1", "a,b", ",", "4294967296"]),
                        st.text(max_size=8))


@settings(max_examples=N or 30, **COMMON)
@given(st.dictionaries(st.sampled_from(["--batch-size", "--device", "--prompt"]), flag_values, max_size=3))
def test_score_flags(capsys, flags):
    from PIL import Image

    with sandbox() as d:
        Image.new("RGB", (8, 8), (10, 200, 30)).save(d / "a.png")
        argv = ["score", "--reward", "brightness", "--json"]
        for k, v in flags.items():
            argv += [f"{k}={v}"]
        rc, msg = run(capsys, argv + [str(d / "a.png")])
        assert "Traceback" not in msg
        assert rc in (0, 2), msg[-800:]


@settings(max_examples=N or 10, **COMMON)
@given(st.dictionaries(st.sampled_from(["--steps", "--guidance-scale", "--eta", "--seeds", "--device"]), flag_values, min_size=1, max_size=3))
def test_sample_flags(capsys, flags):
    # a run that passes the checks samples; keep it to a few steps so an accepted case is quick
    if "--steps" in flags:
        try:
            if 3 < int(flags["--steps"]) <= 1000:
                flags["--steps"] = "2"
        except ValueError:
            pass
    with sandbox() as d:
        argv = ["sample", "--model", "tiny:sd15", "--prompt", "a red apple", "--out", str(d / "s")]
        for k, v in flags.items():
            argv += [f"{k}={v}"]
        if "--steps" not in flags:
            argv += ["--steps", "2"]
        rc, msg = run(capsys, argv)
        assert "Traceback" not in msg
        assert rc in (0, 2), msg[-800:]
        if rc == 2:
            assert not (d / "s").exists()
        else:
            assert (d / "s" / "grid.png").exists()
