"""Evaluate a snapshapes text-to-image pipeline on held-out prompts.

Three numbers, each from a judge the generator was not trained against:
- FID on the evaluation CLIP's image features, generated images vs. real renders of the same prompts;
- CLIP score (100 x cosine, floored at 0) from the evaluation CLIP;
- attribute accuracy (shape, colour, position; size and background reported too) from the
  procedural checker, read against each prompt's ground truth.
"""

from __future__ import annotations

import copy
import time
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

from . import checker, shapes
from .contrastive import EvalClip
from .vocabulary import CaptionIds

EVALCLIP_DIR = Path(__file__).parent / "weights" / "snapshapes-evalclip"
REAL_RENDERS_PER_PROMPT = 4
#: prompts per pipeline call: a small model is launch-bound on a GPU, so fill it; the CPU keeps today's 16
GPU_BATCH, CPU_BATCH = 64, 16

Progress = Callable[[int, int], None]  # (images done, images total)


def load_evaluator(folder: Path = EVALCLIP_DIR) -> EvalClip:
    return EvalClip.load(folder)


@lru_cache(maxsize=2)
def _shared_evaluator(folder: Path = EVALCLIP_DIR) -> EvalClip:
    """One evaluation CLIP per process for :func:`score_images` (read only: scoring never changes it)."""
    return load_evaluator(folder)


def initial_noise(pipe, n: int, seed: int) -> torch.Tensor:
    """The initial latents of all ``n`` prompts, drawn at once from one CPU generator (what diffusers draws per
    call, in the UNet's dtype), so each prompt's noise does not depend on how prompts are batched."""
    size = pipe.unet.config.sample_size
    shape = (n, pipe.unet.config.in_channels, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=pipe.unet.dtype)


def generate(pipeline, captions: list[str], steps: int, cfg: float, seed: int, batch: int | None = None,
             progress: Progress | None = None) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, 128, 128), sampled with DDIM (SD-v1.5's schedule, eta 0).

    ``batch`` (default 64 prompts per call on a GPU, 16 on the CPU) does not change the images beyond float
    rounding: the initial noise of every prompt is drawn up front (:func:`initial_noise`). tests/test_zoo_evaluate.py:
    batch 4 and 8 give the same images to 1e-4 (kernel rounding; bit-equal on 2 CPU threads, 3e-5 apart on one),
    batch 3 within 2e-3 (an 8-bit step is 7.8e-3); the noise is what
    one diffusers call drew before (per-batch draws gave the same for the zoo's 1024-value latents)."""
    from diffusers import DDIMScheduler

    from snapopt.models.attention import sampling_attention

    pipe = copy.copy(pipeline)  # shallow: shares modules, swaps only the scheduler
    pipe.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if batch is None:
        batch = GPU_BATCH if next(pipe.unet.parameters()).device.type == "cuda" else CPU_BATCH
    noise = initial_noise(pipe, len(captions), seed)
    gen = torch.Generator().manual_seed(seed)  # nothing else draws with eta 0; seeded should a sampler need it
    out = []
    with sampling_attention(pipe.unet):  # a run's output ships split-einsum attention for the ANE: sample with sdpa (exact)
        for i in range(0, len(captions), batch):
            chunk = captions[i : i + batch]
            imgs = pipe(chunk, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
                        latents=noise[i : i + batch], generator=gen, output_type="pt").images
            out.append((imgs.float() * 2 - 1).cpu())  # the evaluator runs on the CPU whatever device generated
            if progress:
                progress(i + len(chunk), len(captions))
    return torch.cat(out)


@torch.no_grad()
def _features(model: EvalClip, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.image.features(images[i : i + 64].float()) for i in range(0, len(images), 64)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(ca)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cb @ sqrt_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + ca.trace() + cb.trace() - 2 * cross)


@torch.no_grad()
def clip_score(model: EvalClip, images: torch.Tensor, captions: list[str]) -> float:
    ids = CaptionIds()
    txt = model.encode_text(ids.batch(captions), ids.eos)
    img = torch.cat([model.image(images[i : i + 64].float()) for i in range(0, len(images), 64)])
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def real_images(scenes: shapes.SceneBatch, seed: int, copies: int = REAL_RENDERS_PER_PROMPT) -> torch.Tensor:
    return torch.cat([shapes.render(scenes, seed + 7 + k) for k in range(copies)])


#: per evaluator: the real renders' features per (scenes, seed); every evaluation of a run scores the same prompts
_REAL_FEATURES: "weakref.WeakKeyDictionary[EvalClip, dict]" = weakref.WeakKeyDictionary()


def real_features(evaluator: EvalClip, scenes: shapes.SceneBatch, seed: int) -> torch.Tensor:
    """Evaluation-CLIP features of the real renders of ``scenes``, computed once per process and evaluator (read only)."""
    cache = _REAL_FEATURES.setdefault(evaluator, {})
    key = (tuple(scenes.scenes()), seed)
    if key not in cache:
        cache[key] = _features(evaluator, real_images(scenes, seed))
    return cache[key]


def score_images(images: torch.Tensor, scenes: shapes.SceneBatch, seed: int = 0,
                 evaluator: EvalClip | None = None) -> dict[str, float]:
    """All metrics for given images (B, 3, H, W) in [-1, 1] that were meant to show ``scenes``."""
    evaluator = evaluator or _shared_evaluator()
    result = {
        "fid": frechet_distance(_features(evaluator, images), real_features(evaluator, scenes, seed)),
        "clip_score": clip_score(evaluator, images, scenes.captions()),
    }
    result.update(checker.accuracy(shapes.to_uint8(images), scenes.scenes()))
    return result


def evaluate(pipeline, steps: int = 50, cfg: float = 7.5, n_prompts: int = 64, seed: int = 0,
             progress: Progress | None = None, return_images: bool = False) -> dict:
    """Generate one image per held-out prompt and score it; adds CPU/GPU seconds per image."""
    scenes = shapes.heldout_prompts(n_prompts)
    t0 = time.perf_counter()
    images = generate(pipeline, scenes.captions(), steps, cfg, seed, progress=progress)
    seconds = (time.perf_counter() - t0) / len(images)
    result: dict = {"steps": steps, "cfg": cfg, "n_prompts": n_prompts, "seed": seed, "seconds_per_image": seconds}
    result.update(score_images(images, scenes, seed))
    if return_images:
        result["images"] = images
        result["captions"] = scenes.captions()
    return result


def prompt_blind(pipeline):
    """A deliberately broken copy of a pipeline: its text encoder is re-initialised, so the UNet still
    draws plausible scenes but cannot follow the prompt. Used to show the evaluators catch that."""
    broken = copy.copy(pipeline)
    encoder = copy.deepcopy(pipeline.text_encoder)
    torch.manual_seed(1)
    for module in encoder.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    broken.text_encoder = encoder
    return broken


def save_grid(images: torch.Tensor, path: Path, columns: int = 8) -> Path:
    """Save images (B, 3, H, W) in [-1, 1] as one PNG grid."""
    from PIL import Image

    u = shapes.to_uint8(images)
    rows = [torch.cat(list(u[i : i + columns]), 1) for i in range(0, len(u), columns)]
    if len(rows) > 1 and rows[-1].shape[1] < rows[0].shape[1]:
        pad = torch.full((u.shape[1], rows[0].shape[1] - rows[-1].shape[1], 3), 255, dtype=torch.uint8)
        rows[-1] = torch.cat([rows[-1], pad], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(rows, 0).numpy()).save(path)
    return path
