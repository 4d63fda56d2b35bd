"""train.ema: the moving average follows diffusers' EMAModel schedule (as ImageReward's ReFL
--use_ema), it is what is exported (loaded back as a user would), and a resumed run ends with
the same average as an uninterrupted one."""
import torch

from tests.test_train_e2e import _lora, write_cfg
from vfeedback.cli import main

OVER = {"train.max_steps": 3, "train.ema": True, "log.checkpoint_every": 2, "sampling.eta": 1.0, "sampling.guidance_scale": 1.0}


def test_ema_schedule_export_and_resume(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import EMAModel
    from peft.utils import get_peft_model_state_dict

    from vfeedback.config import load_config
    from vfeedback.engine import Trainer
    from vfeedback.models.tiny import tiny_path

    full = tmp_path / "full"
    cfg_path = write_cfg(tmp_path, full, **OVER)
    snaps = []
    real_step = EMAModel.step

    def recording(self, parameters):
        parameters = list(parameters)
        snaps.append([p.detach().clone() for p in parameters])
        return real_step(self, parameters)

    monkeypatch.setattr(EMAModel, "step", recording)
    tr = Trainer(load_config(str(cfg_path)))
    tr.fit()
    monkeypatch.setattr(EMAModel, "step", real_step)
    assert len(snaps) == 3  # one EMA update per optimizer step
    # EMAModel's schedule (update n: decay min(0.9999, (1 + k) / (10 + k)), k = n - 1, 0 at n = 1):
    # e_1 = w_1, e_2 = 2/11 e_1 + 9/11 w_2, e_3 = 3/12 e_2 + 9/12 w_3
    w1, w2, w3 = snaps
    want = [(3 / 12) * ((2 / 11) * a + (9 / 11) * b) + (9 / 12) * c for a, b, c in zip(w1, w2, w3)]
    for e, w in zip(tr.ema.shadow_params, want):
        assert torch.allclose(e, w, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(want, w3))  # the average is not the last weights

    # the exported LoRA, loaded into a stock pipeline, holds the averaged weights, not the trained ones
    # (copies: on CPU _trainable_state returns the live fp32 weights, which the block restores)
    with tr.ema_weights():
        averaged = {k[len("unet."):]: v.clone() for k, v in tr._trainable_state().items()}
    trained = {k[len("unet."):]: v.clone() for k, v in tr._trainable_state().items()}
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path("sd15")), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(full / "lora"))
    (adapter,) = pipe.unet.peft_config
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
    assert loaded.keys() == averaged.keys()
    for k in loaded:
        assert torch.allclose(loaded[k].float(), averaged[k], atol=1e-6), k
    assert any(not torch.allclose(loaded[k].float(), trained[k], atol=1e-6) for k in loaded)

    # a run killed after the step-2 checkpoint and resumed ends with the same average
    crashed = tmp_path / "crashed"
    cfg2 = write_cfg(tmp_path, crashed, **OVER)
    from vfeedback.algorithms.refl import ReFL

    real = ReFL.train_step
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ReFL, "train_step", dying)
    assert main(["train", str(cfg2)]) == 130
    assert (crashed / "checkpoints" / "step-000002" / "ema.safetensors").exists()
    monkeypatch.setattr(ReFL, "train_step", real)
    assert main(["train", str(cfg2), "--resume"]) == 0
    a, b = _lora(full), _lora(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
