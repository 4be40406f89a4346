"""Before/after measurements for the training jobs."""

from __future__ import annotations

import torch

from snapopt.quality import VALIDATION_PROMPTS
from snapopt.train.data import embed
from snapopt.train.sampling import halved_transitions, sample_latents


@torch.no_grad()
def sample_distance(teacher, student, student_steps: int, teacher_steps: int, *, prompts: int, cfg: float, seed: int, device,
                    halved: bool = False) -> float:
    """Relative L2 distance of the student's ``student_steps``-step DDIM latents to the teacher's
    ``teacher_steps``-step latents from the same noise and prompts (lower is better). ``halved``: the
    teacher walks the student's grid with every step split in two (what step distillation trains for)
    instead of diffusers' own ``teacher_steps`` grid."""
    texts = (VALIDATION_PROMPTS * (prompts // len(VALIDATION_PROMPTS) + 1))[:prompts]
    cond = embed(teacher, texts, device, seed)
    uncond = embed(teacher, [""], device, seed + 1)[0]
    shape = (teacher.unet.config.in_channels, teacher.latent_size, teacher.latent_size)
    path = None
    if halved:
        if teacher_steps != 2 * student_steps:
            raise ValueError(f"halved needs teacher_steps == 2 * student_steps, got {teacher_steps} and {student_steps}")
        path = halved_transitions(student_steps, len(teacher.scheduler.alphas_cumprod), int(teacher.scheduler.config.get("steps_offset", 1)))
    ref = sample_latents(teacher, cond, uncond, steps=teacher_steps, cfg=cfg, shape=shape, seed=seed, device=device, transitions=path)
    out = sample_latents(teacher, cond, uncond, steps=student_steps, cfg=cfg, shape=shape, seed=seed, device=device, unet=student.unet)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def diffusers_pipeline(pipe):
    """A diffusers StableDiffusionPipeline sharing ``pipe``'s modules (for the zoo's evaluators)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                 scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def zoo_metrics(pipe, n_prompts: int, steps: int, cfg: float, seed: int) -> dict:
    """FID (eval-CLIP features), CLIP score and attribute accuracy on held-out snapshapes prompts."""
    from snapopt.zoo.evaluate import evaluate

    res = evaluate(diffusers_pipeline(pipe), steps=steps, cfg=cfg, n_prompts=n_prompts, seed=seed)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}
