"""Step distillation N -> N/2 (SnapFusion Sec. 4): one student DDIM step matches two teacher DDIM steps.

The student samples on diffusers' DDIM grid for N/2 steps (stride r = 1000 // (N/2)); from a grid point t
the teacher takes two DDIM steps t -> t - r//2 -> t - r. The student's target is the output whose single
DDIM step t -> t - r lands exactly where the teacher's two steps did (Salimans & Ho's progressive
distillation target, expressed in the student's prediction type). ``loss.student_steps`` below N/2 makes
each student step match m = N / student_steps teacher steps (direct N -> N/m): the student then learns a
finer solve than the 16-step teacher's, whose own few-step error an N -> N/2 student inherits.

CFG-aware (SnapFusion Sec. 4.2): with probability ``cfg_probability`` per step, guidance with a scale
w ~ U(cfg_range) is applied to the teacher's *and* the student's outputs before the loss, so the student
learns the guided trajectory it will be sampled with; otherwise the plain (conditional) trajectory.
``original_weight`` mixes in the ordinary denoising loss.

Training states (``trajectory_probability``): x_t is noised data, or with that probability per step a state
of the teacher's own sampling trajectory from pure noise (:mod:`snapopt.train.trajectories`), where the
student's step is actually used; there the target is the trajectory's next state.

Learning rate: the student starts as the teacher, whose single step is already within ~1e-3 of its two
steps (unguided). That optimum is sharp: a gradient step of norm 0.1 in weight space multiplies the tiny
model's loss by ~18. Adam moves every weight by about ``lr`` per step, a step of norm ``lr * sqrt(#params)``
(0.37 for the 13.6 M zoo UNet at 1e-4), so at recovery-style rates the student is knocked off the
teacher's trajectory and the distance to it *grows* (0.36 -> 0.52 measured). 1e-5 makes it shrink
(0.36 -> 0.29); docs/training.md has the sweep.

v-prediction student (SnapFusion Sec. 4.1, ``loss.student_prediction: v_prediction``): the student outputs v
and its x_0 is x_hat = alpha_t z_t - sigma_t v_hat, well conditioned at high noise where epsilon's
x_0 = (z_t - sigma_t eps) / alpha_t divides by alpha_t -> 0, which is where a few-step sampler takes its
largest steps. The loss is the same truncated-SNR x_0 error. A student that enters predicting epsilon (the
teacher's weights) would output garbage as v, so :class:`ReparamObjective` first re-expresses it: it learns
its own frozen copy's output converted to v at every timestep (same function, new output), before any
distillation; the job reports how far that moved its samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from snapopt.train.accel import TeacherForward, to_device
from snapopt.train.data import LatentSource
from snapopt.train.diffusion import Schedule, guided
from snapopt.train.dist import DistInfo, shard, step_generator
from snapopt.train.options import StepDistillLoss, TrainOptions, student_step_count
from snapopt.train.recover import per_sample_mse
from snapopt.train.sampling import split_point, student_transitions

if TYPE_CHECKING:
    from snapopt.train.trajectories import TrajectoryPool


class StepDistillObjective:
    name = "step_distill"
    skips_blocks = False

    def __init__(self, teacher, student_unet: nn.Module, train: TrainOptions, loss: StepDistillLoss = StepDistillLoss(), *,
                 device: torch.device, teacher_unet: nn.Module | None = None, data: LatentSource | None = None,
                 student_prediction: str | None = None):
        """``teacher``: the pipeline whose UNet (or ``teacher_unet``) and prediction type teach; the student
        outputs ``loss.student_prediction``, else ``student_prediction`` (what it outputs now), else the teacher's."""
        self.teacher, self.student = teacher, student_unet
        self.teacher_unet = TeacherForward(teacher_unet or teacher.unet, train, device)
        self.train_o, self.lo = train, loss
        self.sched = Schedule(teacher.scheduler, teacher.prediction_type)  # the teacher's outputs
        self.student_prediction = loss.student_prediction or student_prediction or teacher.prediction_type
        self.ssched = Schedule(teacher.scheduler, self.student_prediction)  # the student's
        self.data = data or LatentSource(teacher, train.data, seed=train.seed, device=device, num_train=self.sched.num_train)
        self.student_steps = student_step_count(loss)
        self.substeps = loss.teacher_steps // self.student_steps  # teacher steps per student step
        self.stride = self.sched.num_train // self.student_steps
        offset = int(teacher.scheduler.config.get("steps_offset", 1))
        self.transitions = student_transitions(self.student_steps, loss.grid, self.sched.num_train, offset)
        self.grid = torch.tensor([t for t, _ in self.transitions])
        self.prev = torch.tensor([p for _, p in self.transitions])
        self.forward_model: nn.Module = student_unet
        self._pools = None

    def trainable(self) -> nn.Module:
        return self.student

    # -- the math, separately testable ------------------------------------------------------------------
    @torch.no_grad()
    def teacher_walk(self, x_t, t, cond, uncond, scale=None, t_end=None):
        """x at ``t_end`` (default t - r) after the teacher's ``substeps`` DDIM steps between t and t_end, at
        :func:`split_point` (guided when ``scale`` is given). Tensor arithmetic per sample (no host
        sync: CUDA graphs hold it); a point below 0 becomes t_end, where the remaining steps are identities."""
        t_end = t - self.stride if t_end is None else t_end
        x, here = x_t, t
        for i in range(1, self.substeps + 1):
            there = split_point(t, t_end, i, self.substeps)  # the last one is t_end itself
            there = torch.where(there < 0, t_end, there)
            x = self.sched.ddim_step(self._teacher_pred(x, here, cond, uncond, scale), x, here, there)
            here = there
        return x

    def student_target(self, x_t, t, x_end, t_end=None):
        """The student output (in its own prediction type) whose one DDIM step t -> t_end reaches ``x_end``."""
        t_end = t - self.stride if t_end is None else t_end
        x0 = self.ssched.x0_for_one_step(x_t.double(), x_end.double(), t, t_end)
        return self.ssched.from_x0(x0, x_t.double(), t).to(x_t.dtype)

    def distill_error(self, pred, target, x_t, t):
        """Per-sample distillation error between student outputs. ``snr_trunc``: |x0(pred) - x0(target)|^2 *
        max(SNR_t, 1), Salimans & Ho's truncated-SNR weighting, also SnapFusion's for its v student (x0 =
        alpha_t z_t - sigma_t v); in epsilon space that is the plain MSE times max(1, 1/SNR), so the
        high-noise steps, which decide where a few-step trajectory goes, are not drowned out."""
        return snr_trunc_error(self.ssched, pred, target, x_t, t) if self.lo.weighting == "snr_trunc" else per_sample_mse(pred, target)

    def _teacher_pred(self, x, t, cond, uncond, scale):
        tt = to_device(t, x.device)
        if scale is None:
            return self.teacher_unet(x, tt, cond, return_dict=False)[0].float()
        out = self.teacher_unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond, cond]), return_dict=False)[0].float()
        u, c = out.chunk(2)
        return guided(u, c, scale)

    # -- the loss: seeded draws (eager), then device-only compute (what cuda_graphs captures) ----------------
    def prepare(self) -> None:
        """Called by the trainer before its clock starts: the trajectory pools, when training draws from them."""
        if self.lo.trajectory_probability > 0:
            self.trajectory_pools()

    def trajectory_pools(self) -> dict[bool, "TrajectoryPool"]:
        """The teacher's trajectories, guided and plain, built on first use (``loss.trajectory_probability``)."""
        if self._pools is None:
            from snapopt.train.trajectories import TrajectoryPool

            n, seed = self.lo.trajectory_pool, self.train_o.seed + 7919
            self._pools = {kind: TrajectoryPool(self, n, guided=kind, seed=seed + kind) for kind in (True, False)}
        return self._pools

    def draw(self, step: int, info: DistInfo) -> tuple[tuple[bool, bool], dict[str, torch.Tensor], dict[str, float]]:
        """The step's random choices, from its own generator (same samples on every rank and after a resume):
        ``key`` = (guided?, on the teacher's trajectories?), the device tensors :meth:`loss_from` reads, and the
        numbers to log. Data steps carry x0/noise; trajectory steps carry x_t and its target state x_end."""
        n = self.train_o.batch
        gen = step_generator(self.train_o.seed, step, stream=2)
        k = torch.randint(0, len(self.grid), (n,), generator=gen)
        use_cfg = bool(torch.rand((), generator=gen) < self.lo.cfg_probability)
        lo, hi = self.lo.cfg_range
        scale = lo + (hi - lo) * torch.rand(n, generator=gen) if use_cfg else None  # drawn on every guided step: keeps the order
        on_path = self.lo.trajectory_probability > 0 and bool(torch.rand((), generator=gen) < self.lo.trajectory_probability)
        device = self.data.device
        s = {"t": to_device(shard(self.grid[k], info), device), "t_end": to_device(shard(self.prev[k], info), device)}
        if on_path:
            pool = self.trajectory_pools()[use_cfg]
            i = shard(torch.randint(0, len(pool), (n,), generator=gen), info)
            kk = shard(k, info)
            dev_i, dev_k = to_device(i, pool.states.device), to_device(kk, pool.states.device)
            s["x_t"], s["x_end"] = pool.states[dev_i, dev_k], pool.states[dev_i, dev_k + 1]
            cond = self.data.cond_bank[to_device(pool.prompt[i], self.data.cond_bank.device)].to(device)
            s["cond"], s["uncond"] = cond, self.data.uncond.expand_as(cond)
            if use_cfg:
                s["scale"] = pool.scale[dev_i]  # the scale the trajectory was walked with
        else:
            b = self.data.batch(step, n, info)
            s.update(x0=b.x0, noise=b.noise, cond=b.cond, uncond=b.uncond)
            if use_cfg:
                s["scale"] = to_device(shard(scale, info), device)
        return (use_cfg, on_path), s, {"cfg": float(use_cfg), "trajectory": float(on_path)}

    def loss_from(self, key: tuple[bool, bool], s: dict[str, torch.Tensor]):
        """Loss of one drawn step; device-only (no host synchronisation), so a CUDA graph can hold it. The
        logged ``cfg`` / ``trajectory`` flags are left None for the caller to fill from :meth:`draw`."""
        use_cfg, on_path = key
        t, t_end, cond, uncond, scale = s["t"], s["t_end"], s["cond"], s["uncond"], s.get("scale")
        if on_path:
            x_t, x_end = s["x_t"], s["x_end"]
        else:
            x_t = self.sched.add_noise(s["x0"], s["noise"], t)
            x_end = self.teacher_walk(x_t, t, cond, uncond, scale, t_end)
        target = self.student_target(x_t.float(), t, x_end.float(), t_end)
        if use_cfg:
            out = self.forward_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]), return_dict=False)[0]
            u, c = out.float().chunk(2)
            pred, cond_pred = guided(u, c, scale), c
        else:
            pred = cond_pred = self.forward_model(x_t, t, cond, return_dict=False)[0].float()
        distill = self.distill_error(pred, target, x_t.float(), t)
        if use_cfg and self.lo.cfg_normalise:
            distill = distill / scale.float() ** 2
        total = distill
        parts = {"distill": distill.mean(), "cfg": None, "trajectory": None}
        if self.lo.original_weight > 0 and not on_path:  # the denoising loss needs the data behind x_t
            orig = per_sample_mse(cond_pred, self.ssched.target(s["x0"], s["noise"], t))
            total = total + self.lo.original_weight * orig
            parts["original"] = orig.mean()
        return total.mean(), {k: v.detach() if torch.is_tensor(v) else v for k, v in parts.items()}

    def loss(self, step: int, info: DistInfo):
        key, s, host = self.draw(step, info)
        loss, parts = self.loss_from(key, s)
        return loss, {k: host[k] if v is None else v for k, v in parts.items()}


def snr_trunc_error(sched: Schedule, pred, target, x_t, t):
    """max(SNR_t, 1) * |x0(pred) - x0(target)|^2 per sample, both outputs read under ``sched``'s prediction type."""
    x0_pred, _ = sched.to_x0_eps(pred, x_t, t)
    x0_target, _ = sched.to_x0_eps(target, x_t, t)
    ab = to_device(sched.alpha_bar(t), x_t.device)
    weight = (ab / (1 - ab)).clamp(min=1.0).to(x_t.dtype)
    return weight * per_sample_mse(x0_pred, x0_target)


class ReparamObjective:
    """Switch a UNet's output parametrisation (epsilon -> v) without changing what it computes: the student
    learns its own frozen copy's output, converted to the new type, at x_t from data noised to any training
    timestep, with the truncated-SNR x_0 error. Needed because the student starts from weights that output
    epsilon: read as v from the first step, its samples are noise. Output-KD on the exact converted target
    rather than the plain denoising loss, which would also pull the student towards the data's mean at
    every t and away from the function it is meant to keep."""

    name = "reparametrise"
    skips_blocks = False

    def __init__(self, data_pipe, student_unet: nn.Module, train: TrainOptions, *, source_prediction: str, target_prediction: str,
                 device: torch.device, reference_unet: nn.Module | None = None, data: LatentSource | None = None):
        import copy

        self.student = student_unet
        self.reference = TeacherForward(reference_unet or copy.deepcopy(student_unet).eval(), train, device)
        self.train_o = train
        self.src = Schedule(data_pipe.scheduler, source_prediction)
        self.dst = Schedule(data_pipe.scheduler, target_prediction)
        self.data = data or LatentSource(data_pipe, train.data, seed=train.seed, device=device, num_train=self.src.num_train)
        self.forward_model: nn.Module = student_unet

    def trainable(self) -> nn.Module:
        return self.student

    def target(self, x_t, t, cond):
        """The reference's output at x_t, re-expressed in the target prediction type."""
        ref = self.reference(x_t, to_device(t, x_t.device), cond, return_dict=False)[0].float()
        x0, _ = self.src.to_x0_eps(ref.double(), x_t.double(), t)
        return self.dst.from_x0(x0, x_t.double(), t).float()

    def loss(self, step: int, info: DistInfo):
        b = self.data.batch(step, self.train_o.batch, info)
        gen = step_generator(self.train_o.seed, step, stream=3)
        t = shard(torch.randint(0, self.src.num_train, (self.train_o.batch,), generator=gen), info)
        x_t = self.src.add_noise(b.x0, b.noise, t).float()
        target = self.target(x_t, t, b.cond)
        pred = self.forward_model(x_t, to_device(t, x_t.device), b.cond, return_dict=False)[0].float()
        err = snr_trunc_error(self.dst, pred, target, x_t, t)
        return err.mean(), {"reparam": err.mean().detach()}


def set_prediction_type(pipe, prediction_type: str) -> None:
    """Make ``pipe`` say what its UNet now outputs: ``prediction_type`` and both schedulers' configs (the one
    snapopt samples with and the one a saved model ships), so plain diffusers samples it correctly. New
    scheduler objects: the pass manager's program clone shares them with the model before the pass."""
    if pipe.prediction_type == prediction_type:
        return
    pipe.prediction_type = prediction_type
    if pipe.scheduler is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    shipped = pipe.extra.get("scheduler")
    if shipped is not None:
        pipe.extra = {**pipe.extra, "scheduler": type(shipped).from_config(shipped.config, prediction_type=prediction_type)}


def loss_summary(history: list[dict], frac: float = 0.1) -> dict:
    """Mean distillation error of the CFG-aware and of the plain steps over the first and last ``frac`` of a
    run. The logged total alternates between the two kinds (their scales differ ~30x), so first -> last of
    the raw loss says nothing about whether the student learnt."""
    n = max(1, int(len(history) * frac))
    out = {}
    for kind, flag in (("cfg", 1.0), ("plain", 0.0)):
        for end, rows in (("first", history[:n]), ("last", history[-n:])):
            vals = [r["distill"] for r in rows if "distill" in r and r.get("cfg", 0.0) == flag]
            out[f"distill_{kind}_{end}"] = sum(vals) / len(vals) if vals else None
    return out
