"""kill -9 a tiny run at many moments (mid-step, mid-checkpoint, mid-export), resume each time:
the run always continues from the newest whole checkpoint and ends with the same weights as an
uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train_e2e import BASE


def _cfg(tmp_path, out):
    c = json.loads(json.dumps(BASE))
    c["output_dir"] = str(out)
    c["train"]["max_steps"] = 5
    c["sampling"]["eta"] = 1.0
    c["prompts"]["eval_seeds"] = [0]
    c["log"].update(checkpoint_every=1, keep_checkpoints=2)
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(c))
    return p


def _logged(out) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _cmd(cfg, resume):
    return [sys.executable, "-m", "vfeedback", "train", str(cfg)] + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path):
    from safetensors.torch import load_file

    ref = tmp_path / "ref"
    subprocess.run(_cmd(_cfg(tmp_path, ref), False), check=True, env=ENV, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    cfg = _cfg(tmp_path, out)
    rng = random.Random(0)
    kills, started = 0, False
    for attempt in range(12):
        resume = started and out.exists() and (out / "checkpoints").exists()
        p = subprocess.Popen(_cmd(cfg, resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started = True
        if kills < 5:
            # kill at a moment tied to the run's progress (wall-clock guesses miss on a busy
            # machine): during start-up, or just after step n was logged -- which is when its
            # checkpoint is being written and the next step starts; n = 5 is the final
            # evaluation / checkpoint / LoRA export
            target = rng.choice(["start", 1, 2, 3, 4, 5])
            if target == "start":
                time.sleep(rng.uniform(0.5, 4.0))
            else:
                deadline = time.time() + 300
                while p.poll() is None and time.time() < deadline and _logged(out) < target:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 0.4))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        _, err = p.communicate(timeout=600)
        if p.returncode == 0 and (out / "summary.json").exists():
            break
        assert p.returncode in (-signal.SIGKILL, 0), err.decode()[-2000:]
        # never a half-written checkpoint that claims to be whole
        for ck in (out / "checkpoints").glob("step-*") if (out / "checkpoints").exists() else []:
            assert (ck / "COMPLETE").exists() and (ck / "trainable.safetensors").exists()
    assert (out / "summary.json").exists(), "never finished"
    assert kills >= 2
    a = load_file(str(ref / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert not list(out.glob(".lora-*")) and not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("where", ["prune", "replace"])
def test_a_kill_while_a_checkpoint_is_deleted_never_leaves_a_whole_looking_one_without_weights(tmp_path, monkeypatch, where):
    """rmtree killed halfway (it removed the weights, not yet COMPLETE): the folder being deleted
    must already be out of ``step-*``, so resume never picks a 'complete' checkpoint without weights."""
    import shutil as _shutil

    from vfeedback import rundir
    from vfeedback.rundir import COMPLETE_MARKER, RunDir

    rd = RunDir(tmp_path / "run")
    rd.prepare(resume=False)
    for step in (1, 2, 3):
        ck = rd.checkpoints / f"step-{step:06d}"
        ck.mkdir()
        (ck / "trainable.safetensors").write_bytes(b"w")
        (ck / COMPLETE_MARKER).write_text("")
    real = _shutil.rmtree

    def killed_halfway(path, *a, **k):
        (Path(path) / "trainable.safetensors").unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rundir.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        if where == "prune":
            rd.prune(keep=2)  # deletes step 1
        else:
            rd.discard_checkpoint(rd.checkpoints / "step-000003")  # a step redone after a resume
    monkeypatch.setattr(rundir.shutil, "rmtree", real)
    whole = rd.complete_checkpoints()
    assert whole and all((p / "trainable.safetensors").exists() for p in whole), whole
    assert [p.name for p in whole] == (["step-000002", "step-000003"] if where == "prune" else ["step-000001", "step-000002"])
    # the next prune clears the half-deleted folder
    rd.prune(keep=2)
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == sorted(p.name for p in whole)
