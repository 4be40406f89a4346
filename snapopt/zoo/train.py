"""Train the snapshapes teacher stage by stage: ``python -m snapopt.zoo.train --stage clip|evalclip|vae|unet``.

Order: ``clip`` pretrains the conditioning CLIPTextModel contrastively against a throwaway image tower;
``evalclip`` trains the independent evaluation CLIP; ``vae`` trains the f=8 AutoencoderKL and measures its
latent scaling factor; ``unet`` trains the UNet (epsilon prediction, SD-v1.5 noise schedule) on frozen
text encoder and VAE with 10% caption dropout for classifier-free guidance.

Every stage renders fresh data on the fly, runs under a wall-clock budget (``--minutes``), and writes a
resumable checkpoint to ``<workdir>/<stage>/``: sharded fp32 weights, optimizer state, and
``trainer.json`` with the step, schedule and loss history. Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import architectures, shapes
from .checkpoints import load_optimizer, load_sharded, save_optimizer, save_sharded
from .contrastive import EvalClip, EvalClipConfig, ImageTower, contrastive_loss
from .vocabulary import CaptionIds

STAGES = ("clip", "evalclip", "vae", "unet")
DEFAULTS = {  # batch, learning rate, warmup steps
    "clip": (512, 1e-3, 100),
    "evalclip": (512, 1e-3, 100),
    "vae": (64, 4e-4, 100),
    "unet": (256, 4e-4, 300),
}
CAPTION_DROPOUT = 0.1
KL_WEIGHT = 1e-5


class ConditioningClip(nn.Module):
    """CLIPTextModel (kept) + projection and image tower (discarded after pretraining)."""

    def __init__(self):
        super().__init__()
        self.text_encoder = architectures.build_text_encoder()
        self.text_proj = nn.Linear(architectures.TEXT_WIDTH, 128, bias=False)
        self.image = ImageTower(width=32, embed=128)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class Batches:
    """Seeded stream of (images, token ids) rendered on the training device."""

    def __init__(self, seed: int, batch: int, device: torch.device):
        self.seed, self.batch, self.device = seed, batch, device
        self.ids = CaptionIds()

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.seed * 1_000_003 + step
        scenes = shapes.sample_scenes(self.batch, s, split="train")
        images = shapes.render(scenes, s, device=self.device)
        return images, self.ids.batch(scenes.captions()).to(self.device)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _frozen_text_encoder(workdir: Path, device) -> nn.Module:
    model = ConditioningClip()
    model.load_state_dict(load_sharded(workdir / "clip"))
    return model.text_encoder.to(device).eval().requires_grad_(False)


def _frozen_vae(workdir: Path, device):
    meta = json.loads((workdir / "vae" / "trainer.json").read_text())
    vae = architectures.build_vae(meta["scaling_factor"])
    vae.load_state_dict(load_sharded(workdir / "vae"))
    return vae.to(device).eval().requires_grad_(False)


class Stage:
    """One trainable stage: builds its model and computes a loss for a step."""

    def __init__(self, name: str, workdir: Path, device: torch.device, seed: int, pool_size: int = 0):
        self.name, self.workdir, self.device = name, workdir, device
        torch.manual_seed(seed)
        self.ids = CaptionIds()
        if name == "clip":
            self.model = ConditioningClip()
        elif name == "evalclip":
            self.model = EvalClip(EvalClipConfig(vocab_size=self.ids.size))
        elif name == "vae":
            self.model = architectures.build_vae()
        else:
            self.model = architectures.build_unet()
            self.text_encoder = _frozen_text_encoder(workdir, device)
            self.vae = _frozen_vae(workdir, device)
            from diffusers import DDPMScheduler

            sched = {k: v for k, v in architectures.SCHEDULER.items() if not k.startswith("_")}
            self.noise = DDPMScheduler.from_config(sched)
            self.alphas = self.noise.alphas_cumprod.to(device)
            self._build_latent_pool(seed, pool_size)
            empty = torch.tensor(self.ids.encode(""), device=device)
            with torch.no_grad():
                self.empty_hidden = self.text_encoder(empty[None]).last_hidden_state
        self.model.to(device)

    def _build_latent_pool(self, seed: int, size: int) -> None:
        """Encode a pool of scenes once: the frozen VAE encoder costs more than the UNet step itself.

        The pool keeps each posterior's mean and log-variance, so every draw still samples fresh latents.
        """
        batches = Batches(seed + 424242, 512, self.device)
        params, ids = [], []
        with torch.no_grad(), _autocast(self.device):
            for i in range(max(1, size // 512)):
                images, tok = batches.get(i)
                params.append(self.vae.encode(images).latent_dist.parameters.to(torch.bfloat16))
                ids.append(tok)
        self.pool_params, self.pool_ids = torch.cat(params), torch.cat(ids)
        self.pool_gen = torch.Generator(device=self.device).manual_seed(seed)
        print(f"[unet] latent pool of {len(self.pool_ids)} scenes")

    def draw(self, batches: "Batches", step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs for one step: rendered images, or pooled latent posteriors for the UNet."""
        if self.name != "unet":
            return batches.get(step)
        idx = torch.randint(0, len(self.pool_ids), (batches.batch,), device=self.device, generator=self.pool_gen)
        return self.pool_params[idx], self.pool_ids[idx]

    def loss(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.name == "clip":
            out = m.text_encoder(ids)
            return contrastive_loss(m.image(images), m.text_proj(out.pooler_output), m.logit_scale, ids)
        if self.name == "evalclip":
            return contrastive_loss(m.image(images), m.encode_text(ids, self.ids.eos), m.logit_scale, ids)
        if self.name == "vae":
            post = m.encode(images).latent_dist
            rec = m.decode(post.sample()).sample.float()
            return F.l1_loss(rec, images) + F.mse_loss(rec, images) + KL_WEIGHT * post.kl().mean() / images[0].numel()
        with torch.no_grad():
            mean, logvar = images.float().chunk(2, dim=1)  # pooled posterior parameters, not pixels
            latents = (mean + torch.randn_like(mean) * (0.5 * logvar.clamp(-30, 20)).exp()) * self.vae.config.scaling_factor
            hidden = self.text_encoder(ids).last_hidden_state
            drop = torch.rand(len(ids), device=ids.device) < CAPTION_DROPOUT
            hidden = torch.where(drop[:, None, None], self.empty_hidden.to(hidden.dtype), hidden)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(ids),), device=ids.device)
        a = self.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise
        pred = m(noisy, t, encoder_hidden_states=hidden).sample
        return F.mse_loss(pred.float(), noise)

    def finish(self, trainer_state: dict) -> None:
        """Stage-specific values measured after training (the VAE's latent scaling factor)."""
        if self.name != "vae":
            return
        batches = Batches(seed=999, batch=64, device=self.device)
        with torch.no_grad(), _autocast(self.device):
            lat = torch.cat([self.model.encode(batches.get(i)[0]).latent_dist.sample().float() for i in range(8)])
        trainer_state["scaling_factor"] = float(1.0 / lat.std())
        self.model.config.scaling_factor = trainer_state["scaling_factor"]


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _progress(total_steps: int | None, start: int, stage: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(f"[bold]{stage}"), BarColumn(), TextColumn("{task.completed}/{task.total} {task.description}"),
        TimeElapsedColumn(), disable=not sys.stdout.isatty(),
    )
    task = progress.add_task("", total=total_steps, completed=start)
    return progress, task


def train(stage: str, workdir: Path, minutes: float, steps: int | None, batch: int | None, lr: float | None,
          seed: int, device: str, log_every: int = 50) -> dict:
    dev = torch.device(device)
    folder = workdir / stage
    d_batch, d_lr, warmup = DEFAULTS[stage]
    batch, lr = batch or d_batch, lr or d_lr
    st = Stage(stage, workdir, dev, seed, pool_size=min(65536, 256 * batch))
    params = [p for p in st.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01 if stage != "vae" else 0.0)
    ema = [p.detach().clone() for p in params] if stage == "unet" else None

    state = {"stage": stage, "step": 0, "history": [], "seconds": 0.0, "batch": batch,
             "lr": lr, "seed": seed, "runs": []}
    if (folder / "trainer.json").exists():
        state.update(json.loads((folder / "trainer.json").read_text()))
        state.update(batch=batch, lr=lr)
        weights = load_sharded(folder)
        st.model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("ema.")})
        if ema is not None:
            ema = [weights.get(f"ema.{i}", p.detach()).to(dev).float().clone() for i, p in enumerate(params)]
        resumed_opt = load_optimizer(opt, folder)
        print(f"[{stage}] resuming at step {state['step']} (optimizer state {'restored' if resumed_opt else 'fresh'})")
    st.model.train()
    batches = Batches(seed, batch, dev)
    start_step, t0 = state["step"], time.time()
    budget = minutes * 60
    # Each run is one schedule segment (warmup + cosine), a warm restart when resuming. Without --steps,
    # its length is sized to the wall-clock budget from the speed measured after 20 warm-up steps.
    seg_total = (steps - start_step) if steps and steps > start_step else None
    progress, task = _progress(seg_total, 0, stage)
    recent: list[float] = []
    t_mark = None
    with progress:
        step = start_step
        while (seg_total is None or step - start_step < seg_total) and time.time() - t0 < budget:
            done = step - start_step
            if seg_total is None and done in (20, 70):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if done == 20:
                    t_mark = time.time()
                else:
                    rate = 50 / (time.time() - t_mark)
                    seg_total = int(done + rate * (budget - (time.time() - t0)) * 0.97)
                    progress.update(task, total=seg_total)
                    print(f"[{stage}] {rate:.1f} it/s -> this run's schedule is {seg_total} steps")
            for g in opt.param_groups:
                g["lr"] = lr_at(done, seg_total or 10**5, lr, warmup)
            images, ids = st.draw(batches, step)
            with _autocast(dev):
                loss = st.loss(images, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                decay = min(0.999, (1 + step) / (10 + step))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
            step += 1
            last = seg_total is not None and step - start_step >= seg_total
            recent.append(loss.item() if step % 10 == 0 or last else float("nan"))
            if step % log_every == 0 or last:
                vals = [v for v in recent if v == v]
                mean = sum(vals) / max(1, len(vals))
                state["history"].append([step, mean, round(state["seconds"] + time.time() - t0, 1)])
                recent = []
                progress.update(task, completed=step - start_step, description=f"loss {mean:.4f}")
                if not sys.stdout.isatty():
                    print(f"[{stage}] step {step} loss {mean:.4f} {time.time() - t0:.0f}s", flush=True)
    tail = [v for v in recent if v == v]
    if tail:
        state["history"].append([step, sum(tail) / len(tail), round(state["seconds"] + time.time() - t0, 1)])
    elapsed = time.time() - t0
    state["step"], state["seconds"] = step, state["seconds"] + elapsed
    state["runs"].append({"start": start_step, "steps": step - start_step, "batch": batch, "lr": lr, "seconds": round(elapsed, 1), "device": _device_name(dev)})
    st.finish(state)
    weights = dict(st.model.state_dict())
    if ema is not None:
        weights.update({f"ema.{i}": e for i, e in enumerate(ema)})
    save_sharded({k: v.float() for k, v in weights.items()}, folder)
    save_optimizer(opt, folder)
    (folder / "trainer.json").write_text(json.dumps(state, indent=1))
    print(f"[{stage}] done: step {step}, {elapsed:.0f}s this run, last loss {state['history'][-1][1] if state['history'] else float('nan'):.4f}")
    return state


def pack_for_transfer(workdir: Path, stage: str, out: Path) -> None:
    """Copy a stage's weights (EMA folded in, no optimizer) into ``out/<stage>`` in 15 MB shards.

    The device tool returns at most 64 MB in 8 files; a resumed run then restarts its optimizer.
    """
    weights = load_sharded(workdir / stage)
    ema = {k: v for k, v in weights.items() if k.startswith("ema.")}
    model = {k: v for k, v in weights.items() if not k.startswith("ema.")}
    if ema:
        names = [k for k, _ in _trainable_names(stage, workdir)]
        model.update({name: ema[f"ema.{i}"] for i, name in enumerate(names)})
    save_sharded(model, out / stage)
    (out / stage / "trainer.json").write_text((workdir / stage / "trainer.json").read_text())


def _trainable_names(stage: str, workdir: Path):
    model = architectures.build_unet() if stage == "unet" else None
    if model is None:
        raise ValueError(f"only the unet keeps an EMA, not {stage!r}")
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=STAGES, required=True, action="append",
                    help="stage to train; repeat to run several in order")
    ap.add_argument("--workdir", type=Path, default=Path(".zoo_work"))
    ap.add_argument("--minutes", type=float, nargs="+", default=[5.0], help="wall-clock budget per stage")
    ap.add_argument("--steps", type=int, default=None,
                    help="train up to this total step count (default: as many as the budget allows)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pack", type=Path, default=None, help="after training, copy weights here for transfer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if dev_is_cuda := a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = dev_is_cuda
    minutes = a.minutes + [a.minutes[-1]] * (len(a.stage) - len(a.minutes))
    for stage, mins in zip(a.stage, minutes):
        seed = a.seed + {"clip": 0, "evalclip": 7919, "vae": 1, "unet": 2}[stage]
        train(stage, a.workdir, mins, a.steps, a.batch, a.lr, seed, a.device)
        if a.pack:
            pack_for_transfer(a.workdir, stage, a.pack)


if __name__ == "__main__":
    main()
