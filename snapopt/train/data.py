"""Training batches without an image dataset: x_0 latents plus prompt embeddings, seeded per step.

Every step draws its *global* batch from a generator seeded by (seed, step) alone, so a resumed run and
every DDP rank draw the same samples; each rank then keeps its slice (:func:`snapopt.train.dist.shard`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from snapopt.core.phases import phase
from snapopt.errors import UsageError
from snapopt.train.accel import to_device
from snapopt.train.dist import DistInfo, shard, step_generator
from snapopt.train.options import DataOptions


@dataclass
class Batch:
    x0: torch.Tensor          # (b, C, L, L) latents (scaled like the UNet sees them)
    cond: torch.Tensor        # (b, 77, D) prompt embeddings (empty-prompt embedding where dropped)
    uncond: torch.Tensor      # (b, 77, D) empty-prompt embeddings, for classifier-free guidance
    noise: torch.Tensor       # (b, C, L, L)
    t: torch.Tensor           # (b,) integer timesteps in [0, num_train)
    gen: torch.Generator      # the step's generator, for objectives that draw more (guidance scale, skips)
    pool_index: torch.Tensor | None = None  # (b,) CPU rows of the pool behind x0 (pooled sources), for per-row caches


#: prompt embeddings per text encoder, by prompt list: every stage of a run (and every block_prune round)
#: embeds the same pool, so it is encoded once. Keyed weakly by the encoder module; frozen in every job.
_EMBEDDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
#: encoded zoo pools per VAE encoder, by (n, seed): recover and step_distill draw the same 8192 scenes
_POOLS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def embed(pipe, prompts: list[str], device: torch.device, seed: int = 0) -> torch.Tensor:
    """CLIP last hidden states of ``prompts`` (seeded noise when the pipeline has no text encoder)."""
    dim = pipe.unet.config.cross_attention_dim
    if pipe.text_encoder is None or pipe.tokenizer is None:
        return torch.randn(len(prompts), 77, dim, generator=torch.Generator().manual_seed(seed)).to(device)
    enc = pipe.text_encoder
    cache = _EMBEDDINGS.setdefault(enc, {})
    key = tuple(prompts)
    if key not in cache:
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        dev = next(enc.parameters()).device
        cache[key] = torch.cat([enc(ids[i:i + 64].to(dev))[0].float() for i in range(0, len(ids), 64)])
    return cache[key].to(device)


class LatentSource:
    """x_0 latents and prompt embeddings for a teacher pipeline; see :class:`DataOptions` for the sources."""

    def __init__(self, teacher, o: DataOptions, *, seed: int, device: torch.device, num_train: int = 1000, latent: int | None = None,
                 sampler=None):
        """``sampler``: the pipeline whose UNet samples the ``student`` source's pool (the model being optimised)."""
        if o.source == "student" and sampler is None:
            raise UsageError("data.source 'student' samples with the model's own UNet: only decoder_distill has one to offer")
        self.o, self.seed, self.device, self.num_train = o, seed, device, num_train
        unet = teacher.unet
        self.shape = (unet.config.in_channels, latent or teacher.latent_size, latent or teacher.latent_size)
        prompts = list(o.prompts)
        self.pool_x0: torch.Tensor | None = None
        if o.source == "zoo":
            with phase("zoo scene pool"):
                prompts, self.pool_x0 = _zoo_pool(teacher, o.pool, seed, device)
            self.shape = tuple(self.pool_x0.shape[1:])
        if not prompts and o.prompt_set == "auto":
            from snapopt.quality import domain_prompts

            # a teacher pool drawn for prompts the model never learnt is not what its pipeline decodes at deployment
            prompts = domain_prompts(teacher, o.pool if o.source in ("teacher", "student") else 64, seed) or []
        if not prompts:
            from snapopt.quality import VALIDATION_PROMPTS

            prompts = list(VALIDATION_PROMPTS)
        self.prompts = prompts
        self.cond_bank = embed(teacher, prompts, device, seed)
        self.uncond = embed(teacher, [""], device, seed + 1)[0]
        if o.source in ("teacher", "student"):
            from snapopt.train.sampling import sample_latents

            n = o.pool
            idx = torch.arange(n) % len(prompts)
            # the student source: the model's own UNet and scheduler, prompts embedded by the teacher's text encoder
            with phase(f"{o.source} latent pool"):
                self.pool_x0 = sample_latents(teacher if o.source == "teacher" else sampler, self.cond_bank[idx], self.uncond,
                                              steps=o.teacher_steps, cfg=o.teacher_cfg, shape=self.shape, seed=seed, device=device)
            self.pool_prompt = idx
        elif o.source == "zoo":
            self.pool_prompt = torch.arange(len(prompts))

    def batch(self, step: int, size: int, info: DistInfo = DistInfo()) -> Batch:
        if size % info.world:
            raise UsageError(f"batch {size} does not split evenly over {info.world} processes")
        gen = step_generator(self.seed, 0 if self.o.fixed_batch else step)
        if self.pool_x0 is not None:
            pick = torch.randint(0, len(self.pool_x0), (size,), generator=gen)
            prompt = self.pool_prompt[pick]
            x0 = None
        else:
            prompt = torch.randint(0, len(self.prompts), (size,), generator=gen)
            x0 = torch.randn(size, *self.shape, generator=gen)
        noise = torch.randn(size, *self.shape, generator=gen)
        t = torch.randint(0, self.num_train, (size,), generator=gen)
        drop = torch.rand(size, generator=gen) < self.o.cond_dropout
        rows = shard(torch.arange(size), info)
        pool_index = None
        if x0 is None:
            pool_index = shard(pick, info)
            x0 = self.pool_x0[to_device(pool_index, self.pool_x0.device)]
        else:
            x0 = x0[rows]
        cond = self.cond_bank[to_device(prompt[rows], self.cond_bank.device)]
        uncond = self.uncond.expand_as(cond)
        keep = to_device(~drop[rows], self.device).view(-1, 1, 1)
        cond = torch.where(keep, cond, uncond)
        return Batch(x0=to_device(x0, self.device), cond=cond, uncond=uncond, noise=to_device(noise[rows], self.device), t=t[rows], gen=gen,
                     pool_index=pool_index)


@torch.no_grad()
def _zoo_pool(teacher, n: int, seed: int, device: torch.device) -> tuple[list[str], torch.Tensor]:
    """Render ``n`` snapshapes scenes (training split) and encode them with the teacher's VAE."""
    try:
        from snapopt.zoo import shapes
    except ImportError as exc:  # the zoo is optional
        raise UsageError(f"data.source 'zoo' needs snapopt.zoo: {exc}") from None
    if teacher.vae is None:
        raise UsageError("data.source 'zoo' needs the teacher's VAE to encode images")
    enc = teacher.component("vae_encoder")
    cache = _POOLS.setdefault(teacher.vae, {})  # the encoder view is made anew per call; the VAE is not
    if (n, seed) in cache:
        captions, pool = cache[(n, seed)]
        return list(captions), pool.to(device)
    scenes = shapes.sample_scenes(n, seed, split="train")
    dev = next(enc.parameters()).device
    scale = teacher.vae.config.scaling_factor
    out = []
    for i in range(0, n, 32):
        part = type(scenes)(**{k: v[i:i + 32] for k, v in scenes.__dict__.items()})
        img = shapes.render(part, seed + i, device=dev)
        out.append(enc(img).float() * scale)
    cache[(n, seed)] = (list(scenes.captions()), torch.cat(out))
    return scenes.captions(), cache[(n, seed)][1].to(device)
