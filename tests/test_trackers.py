"""Eval numbers and grids reach accelerate's trackers: a tiny ReFL run logged to TensorBoard,
read back from the event file with TensorBoard's own reader."""
import json

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from tests.test_train_e2e import write_cfg  # noqa: E402
from vfeedback.cli import main  # noqa: E402


def test_tensorboard_gets_eval_rewards_grids_and_curve(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, out, **{"log.trackers": ["tensorboard"], "log.eval_every": 1, "train.max_steps": 2, "sampling.steps": 3,
                                      "refl.stop_range": [1, 2]}, eval_rewards=[{"name": "brightness"}])
    assert main(["train", str(cfg)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # accelerate's TensorBoardTracker writes to logging_dir / project name
    ea = EventAccumulator(str(out / "logs" / "vfeedback"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    # every eval (steps 0, 1, 2) with the numbers summary.json holds
    hist = {e["step"]: e for e in summary["eval_history"]}
    assert sorted(hist) == [0, 1, 2]
    for tag, key in [("eval/eval_reward", "eval_reward"), ("eval/brightness", "eval/brightness")]:
        got = {ev.step: ev.value for ev in ea.Scalars(tag)}
        assert sorted(got) == [0, 1, 2]
        for step, v in got.items():
            assert v == pytest.approx(hist[step][key], rel=1e-6)
    assert "reward_mean" in tags["scalars"] and "loss" in tags["scalars"]
    # the grids as images, pixel for pixel the PNGs in samples/
    grids = {ev.step: ev for ev in ea.Images("eval/grid")}
    assert sorted(grids) == [0, 1, 2]
    import io

    for step, ev in grids.items():
        logged = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
        on_disk = np.asarray(Image.open(out / "samples" / f"step-{step:06d}.png").convert("RGB"))
        assert logged.shape == on_disk.shape and (logged == on_disk).all()
    (curve,) = ea.Images("curves/reward_curve")
    assert curve.step == 2 and (curve.width, curve.height) == Image.open(out / "samples" / "reward_curve.png").size
    assert [ev.step for ev in ea.Images("eval/before_after")] == [2]
