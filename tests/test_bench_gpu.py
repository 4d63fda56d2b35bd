"""The GPU benches' sweeps (bench/refl_step.py --full, bench/rollout_step.py, bench/gpu_sweep.py)
run on tiny:sd15 on the CPU: the JSON they write, the formulas behind each number, the
out-of-memory and wall-budget stops, the Markdown table, and bench/gpu_campaign.sh's CPU mode."""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_sweep  # noqa: E402
import refl_step  # noqa: E402
import rollout_step  # noqa: E402

TINY = ["--model", "tiny", "--batches", "1,2", "--warmup", "0", "--timed", "2", "--sampling-steps", "4", "--matmul-n", "256"]
CELL_KEYS = {"family", "config", "batch", "status", "times_s", "min_s", "median_s", "images_per_s", "flops_per_step",
             "achieved_flops_per_s", "mfu", "peak_mem_bytes", "peak_mem_gib", "peak_mem_kind", "vs_reference", "warmup", "timed",
             "sampling_steps", "resolution", "reward", "switches"}


def check_rows(result: dict, configs=("toolkit", "reference")):
    peak = result["peak_flops"]["flops_per_s"]
    assert peak > 0
    assert {"torch", "diffusers", "device"} <= set(result["env"])
    ok = {(r["config"], r["batch"]): r for r in result["rows"] if r["status"] == "ok"}
    assert set(ok) == {(c, b) for c in configs for b in (1, 2)}
    for (cfg, b), r in ok.items():
        assert CELL_KEYS <= set(r), CELL_KEYS - set(r)
        assert len(r["times_s"]) == 2
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["min_s"] == pytest.approx(min(r["times_s"]))
        assert r["images_per_s"] == pytest.approx(b / r["median_s"])
        assert r["flops_per_step"] > 0
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["median_s"])
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["median_s"] / peak)
        assert r["peak_mem_gib"] == pytest.approx(r["peak_mem_bytes"] / 2**30)
        ref = ok[("reference", b)]
        assert r["vs_reference"] == pytest.approx(r["images_per_s"] / ref["images_per_s"])
    for cfg in configs:
        ratio = ok[(cfg, 2)]["flops_per_step"] / ok[(cfg, 1)]["flops_per_step"]
        assert 1.8 < ratio < 2.2, (cfg, ratio)
    # the toolkit and the reference-style loop do the same arithmetic: the same FLOPs
    for b in (1, 2):
        assert ok[("toolkit", b)]["flops_per_step"] == pytest.approx(ok[("reference", b)]["flops_per_step"], rel=0.02)
    for best in result["best"]:
        cells = [r for r in ok.values() if r["config"] == best["config"]]
        assert best["images_per_s"] == max(r["images_per_s"] for r in cells)
    for r in result["rows"]:
        if r["config"] == "fast" and r["status"] == "skipped":
            assert r["reason"] == refl_step.SPEED_MISSING
    return ok


def test_refl_full_sweep_on_tiny_cpu(tmp_path):
    out = tmp_path / "refl.json"
    rc = refl_step.main(["--full", "sd15", *TINY, "--stop-step", "2", "--configs", "toolkit,reference,fast",
                         "--switches", "channels_last", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, [r for r in result["rows"] if r["status"] == "error"]
    assert result["bench"] == "refl_step --full"
    assert result["settings"]["stop_step"] == 2 and result["settings"]["reward"] == "color"
    speed = refl_step.speed_module() is not None
    ok = check_rows(result, ("toolkit", "reference", "fast") if speed else ("toolkit", "reference"))
    assert ok[("toolkit", 1)]["stop_step"] == 2
    if speed:  # channels_last changes the memory layout, not the arithmetic: the same FLOPs
        for b in (1, 2):
            assert ok[("fast", b)]["switches"] == ["channels_last"]
            assert ok[("fast", b)]["flops_per_step"] == ok[("toolkit", b)]["flops_per_step"]
    table = gpu_sweep.render_table(result)
    assert "| toolkit | sd15 | 2 |" in table and "| reference | sd15 | 1 |" in table


def test_rollout_sweep_on_tiny_cpu(tmp_path):
    out = tmp_path / "rollout.json"
    rc = rollout_step.main([*TINY, "--configs", "toolkit,reference", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, [r for r in result["rows"] if r["status"] == "error"]
    assert result["bench"] == "rollout_step" and result["settings"]["eta"] == 1.0 and result["settings"]["log_probs"]
    check_rows(result)


def test_vit_reward_is_differentiable_and_sized():
    r = refl_step.make_reward("vit-tiny", "cpu", torch.float32)
    x = torch.rand(2, 3, 48, 48, requires_grad=True)
    s = r(x, ["a", "b"])
    assert s.shape == (2,)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # --reward vitl: the ViT-L/14 image tower (304M parameters, 224 px, patch 14), built on the meta device
    big = refl_step.make_reward("vitl", "meta", torch.bfloat16)
    assert 300e6 < sum(p.numel() for p in big.tower.parameters()) < 310e6
    assert big.size == 224 and big.tower.config.patch_size == 14 and big.tower.config.num_hidden_layers == 24


def test_derive_formulas():
    row = gpu_sweep.derive({"batch": 4, "times_s": [3.0, 1.0, 2.0, 10.0, 2.5], "flops_per_step": 50.0, "peak_mem_bytes": 3 * 2**30}, 10.0)
    assert row["median_s"] == 2.5 and row["min_s"] == 1.0
    assert row["images_per_s"] == pytest.approx(4 / 2.5)
    assert row["achieved_flops_per_s"] == pytest.approx(20.0)
    assert row["mfu"] == pytest.approx(2.0)
    assert row["peak_mem_gib"] == 3.0


def _fake_runner(costs: dict, clock: list, oom_at=None):
    """run_cell that advances a fake clock by costs[batch] and raises CUDA OOM at ``oom_at``."""
    calls = []

    def run(cfg, b):
        calls.append((cfg, b))
        if b == oom_at:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        clock[0] += costs[b]
        return {"times_s": [costs[b] / 10] * 3, "flops_per_step": 1e9 * b, "peak_mem_bytes": b * 2**30}

    return run, calls


def test_out_of_memory_stops_the_config_and_is_recorded():
    clock = [0.0]
    run, calls = _fake_runner({1: 1, 2: 2, 4: 4}, clock, oom_at=2)
    rows = gpu_sweep.sweep("sd15", ["toolkit", "reference"], [1, 2, 4], run, peak_flops_per_s=1e12, clock=lambda: clock[0])
    by = {(r["config"], r["batch"]): r for r in rows}
    assert by[("toolkit", 1)]["status"] == "ok"
    assert by[("toolkit", 2)]["status"] == gpu_sweep.OOM == "out of memory"
    assert by[("toolkit", 4)]["status"] == "skipped" and "out of memory at batch 2" in by[("toolkit", 4)]["reason"]
    assert ("toolkit", 4) not in calls  # never attempted after the OOM
    assert by[("reference", 1)]["status"] == "ok" and by[("toolkit", 1)]["vs_reference"] == pytest.approx(1.0)
    assert by[("toolkit", 2)]["vs_reference"] is None


def test_out_of_memory_inside_a_real_cell(monkeypatch):
    """The OOM raised by a step inside CellRunner's measurement (batch 2) is caught and recorded."""
    def builder(family, model_kind, device, dtype, batch, cfg, **kw):
        class M:
            resolution = 64

        def step(i):
            if batch == 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            torch.ones(8, 8) @ torch.ones(8, 8)

        return step, {"switches": []}, M()

    runner = refl_step.CellRunner("sd15", "tiny", "cpu", builders={"toolkit": builder}, configs=refl_step.CONFIGS, warmup=0, timed=2,
                                  extra={}, make_kwargs={})
    rows = gpu_sweep.sweep("sd15", ["toolkit"], [1, 2, 4], runner, peak_flops_per_s=1e9)
    assert [r["status"] for r in rows] == ["ok", "out of memory", "skipped"]
    assert rows[0]["flops_per_step"] == 2 * 8**3


def test_budget_stops_adding_batches_and_records_what_was_skipped():
    clock = [0.0]
    run, calls = _fake_runner({1: 10, 2: 35, 4: 60, 8: 120}, clock)
    rows = gpu_sweep.sweep("sd15", ["toolkit"], [1, 2, 4, 8], run, peak_flops_per_s=1e12, budget_s=100, clock=lambda: clock[0])
    # after batch 2 the clock reads 45: 55 s left < 2 x 35 s: batch 4 and 8 skipped
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped", "skipped"]
    assert all("budget" in r["reason"] for r in rows[2:])
    assert calls == [("toolkit", 1), ("toolkit", 2)]


def test_budget_is_shared_by_the_configs():
    clock = [0.0]
    run, calls = _fake_runner({1: 10, 2: 20, 4: 40}, clock)
    rows = gpu_sweep.sweep("sd15", ["toolkit", "reference"], [1, 2, 4], run, peak_flops_per_s=1e12, budget_s=100, clock=lambda: clock[0])
    # toolkit's share is 50 s: 1 (10 s), 2 (20 s; then 20 s left < 2 x 20): 4 skipped; reference gets the
    # 70 s left: 1 (10 s), 2 (20 s; then 40 s left, not < 2 x 20): 4 runs
    assert [(r["config"], r["batch"], r["status"]) for r in rows] == [
        ("toolkit", 1, "ok"), ("toolkit", 2, "ok"), ("toolkit", 4, "skipped"),
        ("reference", 1, "ok"), ("reference", 2, "ok"), ("reference", 4, "ok")]
    clock = [0.0]
    run, _ = _fake_runner({1: 10, 2: 20, 4: 40}, clock)
    rows = gpu_sweep.sweep("sd15", ["toolkit"], [1, 2, 4], run, peak_flops_per_s=1e12, budget_s=0, clock=lambda: clock[0])
    assert all(r["status"] == "skipped" for r in rows)


def test_render_table_from_a_written_file(tmp_path, capsys):
    clock = [0.0]
    run, _ = _fake_runner({1: 1, 2: 2}, clock, oom_at=2)
    rows = gpu_sweep.sweep("sdxl", ["toolkit+mem", "reference"], [1, 2], run, peak_flops_per_s=2e9, clock=lambda: clock[0])
    result = {"bench": "refl_step --full", "env": {"gpu": "Fake GPU"}, "peak_flops": {"flops_per_s": 2e12, "dtype": "bfloat16"}, "rows": rows}
    p = gpu_sweep.write_json(tmp_path / "r.json", result)
    assert refl_step.main(["--table", str(p)]) == 0
    out = capsys.readouterr().out
    assert "| config | family | batch | images/s | median s/step | min s/step | MFU % | peak GiB | vs reference |" in out
    # batch 1: median 0.1 s -> 10 images/s, 1e9 FLOPs / 0.1 s / 2e9 FLOP/s = 500 %, 1 GiB, same speed as the reference
    assert "| toolkit+mem | sdxl | 1 | 10 | 0.100 | 0.100 | 500.0 | 1.00 | 1.00x |" in out
    assert "| toolkit+mem | sdxl | 2 | out of memory |" in out
    assert "toolkit+mem (sdxl): 10 images/s at batch 1" in out
    assert refl_step.sdxl_memory_check(rows)[0] == {"config": "toolkit+mem", "peak_mem_gib": 1.0, "within_24gib": True,
                                                    "within_24e9_bytes": True, "memory_kind": None}


@pytest.mark.parametrize("cpu", ["1", "0"])
def test_gpu_campaign_dry_run_commands_parse(tmp_path, cpu):
    """``DRY_RUN=1``: the four measurement commands of both modes, each accepted by its script's parser."""
    script = ROOT / "bench" / "gpu_campaign.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "CPU": cpu, "DRY_RUN": "1", "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable}
    if cpu == "0":  # the GPU mode's commands, printed on a machine without one: the device check is what stops it
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA to get past the environment check")
    p = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cmds = [shlex.split(line.removeprefix("DRY_RUN:")) for line in p.stdout.splitlines() if line.startswith("DRY_RUN:")]
    assert len(cmds) == 4
    outs = []
    for c in cmds:
        assert c[0] == sys.executable
        mod = {"bench/refl_step.py": refl_step, "bench/rollout_step.py": rollout_step}[c[1]]
        args = mod.parser().parse_args(c[2:])
        assert args.budget_s > 0 and args.model == ("tiny" if cpu == "1" else "full")
        outs.append(Path(args.out).name)
    tag = "cpu-tiny" if cpu == "1" else gpu_sweep.device_tag("cuda")
    assert outs == [f"refl_step_full_sd15-{tag}.json", f"refl_step_full_sdxl-{tag}.json", f"rollout_step_ddpo-{tag}.json",
                    f"rollout_step_d3po-{tag}.json"]


@pytest.mark.slow
def test_gpu_campaign_cpu_mode(tmp_path):
    """``CPU=1 bash bench/gpu_campaign.sh``: the same script on tiny models, every JSON written."""
    script = ROOT / "bench" / "gpu_campaign.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "CPU": "1", "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in tmp_path.glob("*.json"))
    assert files == ["refl_step_full_sd15-cpu-tiny.json", "refl_step_full_sdxl-cpu-tiny.json", "rollout_step_d3po-cpu-tiny.json",
                     "rollout_step_ddpo-cpu-tiny.json"], files
    for f in tmp_path.glob("*.json"):
        r = json.loads(f.read_text())
        assert any(row["status"] == "ok" for row in r["rows"]), f
    assert "torch" in p.stdout and "| config | family |" in p.stdout


def test_ratios_compare_like_with_like():
    """A row with UNet gradient checkpointing is compared with the reference loop that has it
    too (``reference+mem``), one without with ``reference``; no such reference: no ratio."""
    def row(config, batch, ips, gc):
        return {"family": "sdxl", "config": config, "batch": batch, "status": "ok", "images_per_s": ips, "gradient_checkpointing": gc}

    rows = [row("lowmem", 1, 3.0, True), row("toolkit", 1, 8.0, False), row("reference+mem", 1, 2.0, True),
            row("reference", 1, 4.0, False), row("lowmem", 2, 5.0, True)]
    gpu_sweep.add_ratios(rows)
    assert [r["vs_reference"] for r in rows] == [1.5, 2.0, 1.0, 1.0, None]


@pytest.mark.parametrize("flags,where", [
    (["--batches", "abc"], "--batches"), (["--batches", "0"], "--batches"), (["--batches", "1,,2"], "--batches"),
    (["--batches", ""], "--batches"), (["--budget-s", "nan"], "--budget-s"), (["--budget-s", "-5"], "--budget-s"),
    (["--timed", "0"], "--timed"), (["--warmup", "-1"], "--warmup"), (["--matmul-n", "0"], "--matmul-n"),
    (["--stop-step", "9"], "--stop-step"), (["--configs", "turbo"], "--configs"), (["--switches", "warp"], "--switches"),
    (["--device", "gpu0"], "--device"),
])
def test_bad_sweep_flags_exit_2_naming_the_flag(flags, where, capsys):
    """A bad value or combination stops before any model is built: exit status 2, the flag named."""
    with pytest.raises(SystemExit) as e:
        refl_step.main(["--full", "sd15", *TINY, "--stop-step", "2", "--device", "cpu", *flags])
    assert e.value.code == 2
    assert where in capsys.readouterr().err
