"""Images per second of the online methods' rollouts (D3PO, DDPO, GRPO): sampling with per-step
log-probs, no grad, then the reward, as a batch sweep (1, 2, 4, 8, 16 until out of memory).

Configurations: ``toolkit`` (``vfeedback.sampling.sample(eta=1, log_probs=True,
return_trajectory=True, decode=True)`` under no_grad, LoRA rank 4 attached, then the reward),
``fast`` (the same with vfeedback.models.speed's switches), and ``reference``: the loop written
the way ddpo-pytorch's ``pipeline_with_logprob`` writes it (diffusers components called directly,
DDIMScheduler.set_timesteps, a hand-written ``ddim_step_with_logprob`` per step, the latents and
log-probs collected in lists, vae.decode), same LoRA, bf16 weights under bf16 autocast, SDPA,
no compile. Defaults follow configs/ddpo/sd15.yaml and configs/grpo/sd15.yaml: 50 steps, eta 1,
CFG 5; D3PO's configs use 20 steps (``--sampling-steps 20``). Per cell the same numbers as
``refl_step.py --full`` (bench/gpu_sweep.py): min / median s per rollout batch, images/s, FLOPs
(torch's flop counter), MFU against the same run's bf16 matmul peak, peak memory, images/s over
the reference's.

    python bench/rollout_step.py --family sd15 --budget-s 120          # on a GPU
    python bench/rollout_step.py --sampling-steps 20 --out bench/results/rollout_step_d3po-h200.json
    python bench/rollout_step.py --model tiny --batches 1,2 --timed 2   # CPU smoke
    python bench/rollout_step.py --table bench/results/rollout_step-h200.json

Writes bench/results/rollout_step-<device>[-tiny].json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpu_sweep  # noqa: E402
from refl_step import (CONFIGS, LORA_RANK, PROMPTS, add_sweep_args, autocast, build_model, generators,  # noqa: E402
                       make_reward, pipe_text, run_families, speed_module, sweep_main)

ROLLOUT_STEPS, ROLLOUT_GUIDANCE, ETA = 50, 5.0, 1.0
DEFAULT_CONFIGS = "toolkit,fast,reference"


def toolkit_rollout(family, model_kind, device, dtype, batch, cfg, *, steps, reward_name, switches, guidance):
    """The toolkit's rollout: the DDIM sampler keeping the trajectory and each step's log-prob."""
    from vfeedback.models import add_lora
    from vfeedback.sampling import sample

    model = build_model(family, model_kind, device, dtype)
    params = add_lora(model, rank=LORA_RANK)
    for p in params:
        p.data = p.data.float()
    if cfg["fast"]:
        speed_module().apply_speed_switches(model, **{s: True for s in switches})
    model.unet.eval()
    reward = make_reward(reward_name, device, dtype)
    prompts = (PROMPTS * batch)[:batch]

    @torch.no_grad()
    def step(i):
        with autocast(device):
            cond = model.encode_prompt(prompts, cfg=True)
            out = sample(model, cond, num_steps=steps, guidance_scale=guidance, eta=ETA, generator=generators(i, batch),
                         log_probs=True, return_trajectory=True, decode=True)
            reward(out.images.float(), prompts)
        return out

    return step, {"switches": list(switches) if cfg["fast"] else []}, model


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, generator=None):
    """ddpo-pytorch's ``ddim_step_with_logprob`` (diffusers_patch/ddim_with_logprob.py), as written there:
    DDIMScheduler.step's arithmetic by hand plus the Gaussian log-density of the drawn sample."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, scheduler.config.num_train_timesteps - 1)
    ac = scheduler.alphas_cumprod
    alpha_prod_t = ac.gather(0, timestep.cpu().view(1)).to(sample.device)
    alpha_prod_t_prev = torch.where(prev_timestep.cpu() >= 0, ac.gather(0, prev_timestep.cpu().view(1)),
                                    scheduler.final_alpha_cumprod).to(sample.device)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    pred_epsilon = model_output
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance**0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
    variance_noise = torch.randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
    prev_sample = prev_sample_mean + std_dev_t * variance_noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t**2)) - torch.log(std_dev_t)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample.type(sample.dtype), log_prob


def reference_rollout(family, model_kind, device, dtype, batch, cfg, *, steps, reward_name, switches=(), guidance):
    """ddpo-pytorch's ``pipeline_with_logprob`` loop, diffusers components called directly."""
    from diffusers import DDIMScheduler
    from peft import LoraConfig

    model = build_model(family, model_kind, device, dtype)
    pipe = model.pipe
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n_, p in unet.named_parameters():
        if "lora" in n_:
            p.data = p.data.float()
    unet.eval()
    reward = make_reward(reward_name, device, dtype)
    prompts = (PROMPTS * batch)[:batch]
    c, s = unet.config.in_channels, model.resolution // model.vae_scale_factor

    @torch.no_grad()
    def step(i):
        torch.manual_seed(i)  # ddpo-pytorch passes no generator: the noise is drawn on the device
        with autocast(device):
            hs, added = pipe_text(pipe, family, prompts, device, model.resolution)
            scheduler.set_timesteps(steps, device=device)
            timesteps = scheduler.timesteps
            latents = torch.randn((batch, c, s, s), device=device) * scheduler.init_noise_sigma
            all_latents, all_log_probs = [latents], []
            for t in timesteps:
                latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred = unet(latent_model_input, t, encoder_hidden_states=hs, added_cond_kwargs=added, return_dict=False)[0]
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
                latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred.float(), t, latents, ETA)
                all_latents.append(latents)
                all_log_probs.append(log_prob)
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
            image = (image / 2 + 0.5).clamp(0, 1)
            reward(image.float(), prompts)
        return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1)

    return step, {"switches": []}, model


def run_rollouts(args, device) -> dict:
    def check(names):
        bad = [c for c in names if c not in CONFIGS or CONFIGS[c]["gc"]]
        if bad:
            gpu_sweep.usage_error(f"--configs: {bad} not rollout configs; use toolkit, fast, reference")

    return run_families(args, device, bench="rollout_step", families=[f for f in args.family.split(",") if f],
                        settings={"eta": ETA, "guidance_scale": args.guidance, "log_probs": True, "return_trajectory": True},
                        default_configs=lambda fam: DEFAULT_CONFIGS, check_configs=check,
                        builders={"toolkit": toolkit_rollout, "reference": reference_rollout},
                        extra={"sampling_steps": args.sampling_steps, "eta": ETA, "reward": args.reward},
                        make_kwargs=dict(steps=args.sampling_steps, reward_name=args.reward, guidance=args.guidance))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", help="comma list: sd15,sdxl")
    ap.add_argument("--sampling-steps", type=gpu_sweep.positive_int, default=None, help=f"DDIM steps per rollout (default {ROLLOUT_STEPS}: DDPO / GRPO; D3PO: 20)")
    ap.add_argument("--guidance", type=gpu_sweep.positive_float, default=ROLLOUT_GUIDANCE, help="CFG scale (the online configs: 5)")
    add_sweep_args(ap)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    return sweep_main(args, "rollout_step", run_rollouts, ROLLOUT_STEPS)


if __name__ == "__main__":
    sys.exit(main())
