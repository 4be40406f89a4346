"""Decoder data distillation (SnapFusion Sec. 3.3): a pruned VAE decoder learns to reproduce the teacher
decoder's images from latents. No images are needed: latents come from the data source (random, teacher
samples, encoded zoo scenes, or samples of the model's own UNet), the teacher decoder supplies the targets.

With a pooled source (zoo, teacher, student) the teacher decodes each pool latent once and its image is cached: on a
CPU the teacher's forward would otherwise cost about as much as the student's forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from snapopt.core.phases import phase
from snapopt.train.data import LatentSource
from snapopt.train.dist import DistInfo
from snapopt.train.options import DecoderLoss, TrainOptions


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def reconstruction_loss(lo, out: torch.Tensor, ref: torch.Tensor):
    """The decoder's loss (MSE, plus MSE of 2x/4x pooled images when ``lo.multiscale``, of pixel differences when
    ``lo.edges``) and its detached parts; one definition for the eager step and the CUDA-graph step (snapopt.train.graphs)."""
    mse = F.mse_loss(out, ref)
    total = lo.mse * mse
    parts = {"mse": mse}
    if lo.multiscale > 0:
        ms = sum(F.mse_loss(F.avg_pool2d(out, k), F.avg_pool2d(ref, k)) for k in (2, 4)) / 2
        total = total + lo.multiscale * ms
        parts["multiscale"] = ms
    if lo.edges > 0:
        edges = (F.mse_loss(_dx(out), _dx(ref)) + F.mse_loss(_dy(out), _dy(ref))) / 2
        total = total + lo.edges * edges
        parts["edges"] = edges
    return total, {k: v.detach() for k, v in parts.items()}


def _dx(img: torch.Tensor) -> torch.Tensor:
    return img[..., :, 1:] - img[..., :, :-1]


def _dy(img: torch.Tensor) -> torch.Tensor:
    return img[..., 1:, :] - img[..., :-1, :]


#: the largest pool of teacher images (fp32 bytes) decoded up front; a larger one is decoded as batches draw it
PREFILL_BYTES = 2 << 30


class DecoderObjective:
    name = "decoder_distill"
    skips_blocks = False

    def __init__(self, teacher, student_decoder: nn.Module, train: TrainOptions, loss: DecoderLoss = DecoderLoss(), *,
                 device: torch.device, data: LatentSource | None = None, sampler=None):
        self.teacher_decoder = teacher.component("vae_decoder")
        self.student = student_decoder
        self.train_o, self.lo = train, loss
        self.scale = float(teacher.vae.config.scaling_factor)
        self.data = data or LatentSource(teacher, train.data, seed=train.seed, device=device, sampler=sampler)
        self.val_z = self._held_out(teacher, train, loss.val_latents, device, sampler) / self.scale
        self._val_ref: torch.Tensor | None = None
        self.forward_model: nn.Module = student_decoder
        pool = self.data.pool_x0
        self._pool = None if pool is None else pool.flatten(1)
        self._cache: dict[int, torch.Tensor] = {}  # pool index -> the teacher decoder's image
        if pool is not None:
            with phase("teacher decoder images"):
                self._prefill(pool)

    def trainable(self) -> nn.Module:
        return self.student

    def _held_out(self, teacher, train: TrainOptions, n: int, device: torch.device, sampler) -> torch.Tensor:
        """``n`` latents training never draws, for PSNR. A pooled source's batches are rows of its pool, which
        training sees many times over (3000 x 32 draws from 4096 rows): PSNR there measured fitting. So a second,
        small pool of the same kind, drawn with seed + 1. Random latents: step -1's draw, never a training step's."""
        if self.data.pool_x0 is None:
            return self.data.batch(-1, n).x0
        held = LatentSource(teacher, train.data.model_copy(update={"pool": n}), seed=train.seed + 1, device=device, sampler=sampler)
        return held.pool_x0.to(device)

    @torch.no_grad()
    def _prefill(self, pool: torch.Tensor, chunk: int = 256) -> None:
        """Decode the whole pool once, in fixed-size batches, when its images fit :data:`PREFILL_BYTES`. Filled
        lazily, batch by batch, the cache handed the teacher decoder a new batch size on most early steps (cuDNN
        tunes each new shape): a GPU chain's first 300 decoder steps ran 5x slower than the rest, ~25 s."""
        first = self.teacher_decoder(pool[:1] / self.scale)
        if len(pool) * first.numel() * 4 > PREFILL_BYTES:
            return  # SD-size images of a large pool: stay lazy
        for a in range(0, len(pool), chunk):
            self._decode(list(range(a, min(a + chunk, len(pool)))), pool[:1])

    @torch.no_grad()
    def psnr_vs_teacher(self) -> float:
        was = self.student.training
        self.student.eval()
        if self._val_ref is None:
            self._val_ref = torch.cat([self.teacher_decoder(z[None]) for z in self.val_z])
        ref = self._val_ref
        out = torch.cat([self.student(z[None]) for z in self.val_z])
        self.student.train(was)
        return psnr(out, ref)

    def loss(self, step: int, info: DistInfo):
        b = self.data.batch(step, self.train_o.batch, info)
        z = b.x0 / self.scale
        ref = self.targets(b.x0, z, b.pool_index)
        return reconstruction_loss(self.lo, self.forward_model(z).float(), ref)

    @torch.no_grad()
    def targets(self, x0: torch.Tensor, z: torch.Tensor, pool_index: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher decoder's images of ``z``: from the cache for pool latents, each decoded once.
        ``pool_index``: the batch's pool rows (Batch.pool_index, on the host), so no lookup and no device sync;
        without it the rows are found by comparing ``x0`` with the pool, and rows not in it are decoded afresh."""
        if self._pool is None:
            return self.teacher_decoder(z).float()
        if pool_index is not None:
            return self._cached(pool_index.tolist(), x0, z)
        hit = (x0.flatten(1).to(self._pool.device)[:, None, :] == self._pool[None]).all(-1)  # exact: batches are rows of the pool
        found, idx = hit.any(1).tolist(), hit.float().argmax(1).tolist()
        if all(found):
            return self._cached(idx, x0, z)
        rows = [i for i, f in zip(idx, found) if f]
        cached = iter(self._cached(rows, x0, z)) if rows else iter(())
        fresh = iter(self.teacher_decoder(z[~torch.tensor(found, device=z.device)]).float())
        return torch.stack([next(cached) if f else next(fresh) for f in found])

    def _cached(self, idx: list[int], x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The teacher's images of pool rows ``idx``, decoding (in one batch) those not cached yet."""
        missing = sorted(set(idx) - self._cache.keys())
        if missing:
            self._decode(missing, z)
        return torch.stack([self._cache[i] for i in idx])

    def _decode(self, rows: list[int], like: torch.Tensor) -> None:
        """Decode pool ``rows`` with the teacher into the cache (latents shaped, typed and placed like ``like``)."""
        z = self._pool[torch.tensor(rows, device=self._pool.device)].view(len(rows), *like.shape[1:]).to(like)
        self._cache.update(zip(rows, self.teacher_decoder(z / self.scale).float()))
