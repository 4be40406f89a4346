"""Quality evaluators for decisions inside passes (block pruning's ΔQuality).

An evaluator scores a pipeline; *lower is better*, so ΔQuality = score(with change) − score(baseline) is the
quality a change costs. ``teacher_distance`` needs no evaluation weights: the relative distance of the UNet's
noise predictions to the teacher's on a seeded validation batch, over timesteps spread across the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from snapopt.models.pipeline import Pipeline

VALIDATION_PROMPTS = [
    "a small red circle left of a blue square on a white background",
    "a photo of a cat sitting on a wooden chair",
    "a mountain lake at sunrise, oil painting",
    "a large green triangle above a yellow circle",
    "a portrait of an astronaut, studio lighting",
    "a bowl of fruit on a kitchen table",
    "two blue squares on a black background",
    "a city street at night in the rain",
]


class QualityEvaluator(Protocol):
    name: str

    def score(self, pipe: Pipeline) -> float: ...


@dataclass
class TeacherDistance:
    """Mean relative L2 distance of the UNet's outputs to the teacher's (weight-free, deterministic).

    All timesteps go through the UNet as one batch: one forward per evaluation."""

    teacher_output: torch.Tensor
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    groups: int
    name: str = "teacher_distance"

    @classmethod
    def prepare(cls, teacher: Pipeline, *, latent: int, prompts: int = 4, timesteps: tuple[int, ...] = (999, 750, 500, 250, 50),
                seed: int = 0, texts: list[str] | None = None) -> "TeacherDistance":
        """``texts``: the prompts (default: VALIDATION_PROMPTS, repeated to ``prompts``)."""
        gen = torch.Generator().manual_seed(seed)
        texts = texts[:prompts] if texts else (VALIDATION_PROMPTS * (prompts // len(VALIDATION_PROMPTS) + 1))[:prompts]
        context = text_context(teacher, texts, gen)
        channels = teacher.unet.config.in_channels
        n = len(timesteps)
        device = next(teacher.unet.parameters()).device
        sample = torch.randn(n * prompts, channels, latent, latent, generator=gen)
        steps = torch.tensor([float(t) for t in timesteps]).repeat_interleave(prompts)
        inputs = tuple(t.to(device) for t in (sample, steps, context.repeat(n, 1, 1)))
        return cls(teacher_output=_unet(teacher, inputs), inputs=inputs, groups=n)

    def score(self, pipe: Pipeline) -> float:
        """Relative distance per timestep, averaged over timesteps."""
        out = _unet(pipe, self.inputs).chunk(self.groups)
        ref = self.teacher_output.chunk(self.groups)
        dists = [((o - r).norm() / r.norm().clamp_min(1e-12)).item() for o, r in zip(out, ref)]
        return float(sum(dists) / len(dists))


def domain_prompts(pipe: Pipeline, n: int, seed: int = 0) -> list[str] | None:
    """``n`` captions of the distribution ``pipe`` was trained on, when it is known (zoo:snapshapes and its
    descendants: the zoo's *training* split, never the held-out captions its scores use), else None.
    Half of VALIDATION_PROMPTS are scenes such a model never learnt, and a quality signal measured there is
    mostly about what it draws for prompts it cannot serve."""
    if not snapshapes_model(pipe):
        return None
    from snapopt.zoo import shapes

    return shapes.sample_scenes(n, seed, split="train").captions()


def text_context(pipe: Pipeline, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """CLIP embeddings of ``prompts`` when the pipeline has a text encoder and tokenizer, else seeded noise."""
    dim = pipe.unet.config.cross_attention_dim
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return torch.randn(len(prompts), 77, dim, generator=gen)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids.to(next(pipe.text_encoder.parameters()).device))[0].float().cpu()


def _unet(pipe: Pipeline, x) -> torch.Tensor:
    """The UNet's output as epsilon, so a v-prediction student is compared with an epsilon teacher like for like."""
    with torch.no_grad():
        out = pipe.unet(x[0], x[1], x[2], return_dict=False)[0].float()
    if pipe.prediction_type != "epsilon":
        from snapopt.train.diffusion import Schedule

        out = Schedule(pipe.scheduler, pipe.prediction_type).to_x0_eps(out, x[0].float(), x[1])[1]
    return out


# ---- quality retained: the final pipeline against the input model --------------------------------------------
def snapshapes_model(pipe: Pipeline) -> bool:
    """Whether the zoo's snapshapes evaluator can judge ``pipe`` (it descends from zoo:snapshapes)."""
    origin = str(pipe.extra.get("origin") or pipe.source)
    if origin.startswith("zoo:snapshapes"):
        return True
    from pathlib import Path

    from snapopt import zoo

    try:
        return Path(origin).resolve() == zoo.zoo_path("snapshapes").resolve()
    except Exception:
        return False


def quality_retained(teacher: Pipeline, student: Pipeline, *, steps: int, teacher_steps: int = 50, prompts: int = 16,
                     cfg: float = 7.5, seed: int = 0, grid=None, say=None) -> dict:
    """FID / CLIP score / attribute accuracy of ``student`` at ``steps`` and ``teacher`` at ``teacher_steps`` on the
    same held-out snapshapes prompts and the same initial noise, and a grid of both (teacher row above student
    row, prompt by prompt). Returns {"teacher": metrics, "student": metrics, "prompts": [...], "grid": path}."""
    from snapopt.zoo import evaluate as zev

    say = say or (lambda msg: None)
    result: dict = {"prompts": prompts, "cfg": cfg, "seed": seed}
    images = {}
    for name, pipe, n in (("teacher", teacher, teacher_steps), ("student", student, steps)):
        say(f"quality: {name} at {n} steps on {prompts} held-out prompts")
        r = zev.evaluate(pipe.to_diffusers(), steps=n, cfg=cfg, n_prompts=prompts, seed=seed, return_images=True)
        images[name] = r.pop("images")
        result["captions"] = r.pop("captions")
        result[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    if grid is not None:
        import torch

        cols = min(8, prompts)  # input row above output row, prompt by prompt
        rows = []
        for i in range(0, prompts, cols):
            rows += [images["teacher"][i:i + cols], images["student"][i:i + cols]]
        zev.save_grid(torch.cat(rows), grid, columns=cols)
        result["grid"] = str(grid)
    return result
