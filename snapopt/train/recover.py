"""Distillation recovery of a UNet from its teacher (BK-SDM; SnapGen's timestep-aware scaling).

loss = task * |s(x_t) - target|^2 + output_kd * |s(x_t) - T(x_t)|^2 + feature_kd * sum_stages |s_k - T_k|^2
       + guidance_kd * |(s(x_t, c) - s(x_t, "")) - (T(x_t, c) - T(x_t, ""))|^2

The last term is ours (CFG-aware KD, SnapFusion's idea for step distillation moved into recovery): sampling
with guidance w uses u + w (c - u), so an error in the student's guidance direction c - u reaches the image
multiplied by w (7.5 in the recipes), while output KD only sees each branch's own error. It runs a
``guidance_fraction`` share of the batch a second time with the empty prompt, through teacher and student.

``target`` is the noise or v (the scheduler's prediction_type). With ``timestep_scaling`` each KD term is
rescaled per sample to the task loss's magnitude at that sample's timestep (a stop-gradient ratio): the
task and KD losses differ by orders of magnitude across t, and without it one of them dominates at each
end of the schedule (SnapGen, Sec. 4.1; this is our reading of it).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from snapopt.train.accel import TeacherForward, to_device
from snapopt.train.data import LatentSource
from snapopt.train.diffusion import Schedule
from snapopt.train.features import FeatureMatcher
from snapopt.train.options import RecoverLoss, RobustOptions, TrainOptions
from snapopt.train.robust import RandomSkipper, SkipGates
from snapopt.train.dist import DistInfo, step_generator


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class RecoverObjective:
    name = "recover"

    def __init__(self, teacher, student_unet: nn.Module, train: TrainOptions, loss: RecoverLoss = RecoverLoss(),
                 robust: RobustOptions = RobustOptions(), *, device: torch.device, data: LatentSource | None = None):
        self.teacher, self.student = teacher, student_unet
        self.train_o, self.lo = train, loss
        self.sched = Schedule(teacher.scheduler, teacher.prediction_type)
        self.data = data or LatentSource(teacher, train.data, seed=train.seed, device=device, num_train=self.sched.num_train)
        #: the frozen teacher as trained against (bf16 copy / compiled per the options); hooks go on its module
        self.teacher_fwd = TeacherForward(teacher.unet, train, device)
        self.matcher = FeatureMatcher(self.teacher_fwd.module, student_unet, loss.stages or None) if loss.feature_kd > 0 else None
        self.skipper = RandomSkipper(student_unet, robust) if robust.enabled else None
        self.skips_blocks = self.skipper is not None
        #: robust skipping as data (a gate per candidate block), the same computation as the captured step
        self.gates = SkipGates(student_unet, self.skipper) if self.skipper is not None and self.skipper.candidates else None
        self._skip: torch.Tensor | None = None  # this step's gates, for optimizer_step()
        self.forward_model: nn.Module = student_unet
        self.skip_counts: dict[str, int] = {}

    def trainable(self) -> nn.Module:
        return self.student

    def draw(self, step: int, info: DistInfo) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The step's seeded samples (the batch; robust training's gate vector) and the numbers to log: what
        :meth:`loss_from` reads. Eager in both the ordinary loop and a captured step (snapopt.train.graphs)."""
        b = self.data.batch(step, self.train_o.batch, info)
        s = {"x0": b.x0, "noise": b.noise, "cond": b.cond, "t": b.t}
        host = {}
        if self.skipper is not None:
            names = []
            if self.gates is not None:
                names, s["skip"] = self.draw_skips(step)
            host["skipped"] = float(len(names))
        return s, host

    def loss_from(self, s: dict[str, torch.Tensor]):
        """Loss of one drawn step; device-only, so a CUDA graph can hold it. ``skipped`` is left None for the
        caller to fill from :meth:`draw`."""
        x_t = self.sched.add_noise(s["x0"], s["noise"], s["t"])
        t = to_device(s["t"], x_t.device)
        n, m = len(x_t), self.guidance_rows(len(x_t))
        x_in, t_in, c_in = x_t, t, s["cond"]
        if m:  # the first m samples again, with the empty prompt: one forward of n + m rows each
            x_in, t_in = torch.cat([x_t, x_t[:m]]), torch.cat([t, t[:m]])
            c_in = torch.cat([s["cond"], self.data.uncond.expand_as(s["cond"][:m])])
        want_teacher = self.lo.output_kd > 0 or self.lo.feature_kd > 0 or m > 0
        t_all = None
        if want_teacher:
            t_all = self.teacher_fwd(x_in, t_in, c_in, return_dict=False)[0]
        ctx = nullcontext()
        if "skip" in s:
            self._skip = to_device(s["skip"], x_t.device)  # pinned: no stall of the queue
            ctx = self.gates.gated(self._skip)
        with ctx:
            s_all = self.forward_model(x_in, t_in, c_in, return_dict=False)[0]
        s_out, t_out = s_all[:n], (t_all[:n] if t_all is not None else None)
        task = per_sample_mse(s_out, self.sched.target(s["x0"], s["noise"], s["t"]))
        parts = {"task": task.mean()}
        total = self.lo.task * task
        if self.lo.output_kd > 0:
            out_kd = per_sample_mse(s_out, t_out)
            parts["output_kd"] = out_kd.mean()
            total = total + self.lo.output_kd * self._scaled(out_kd, task)
        if self.matcher is not None:
            feat = self.matcher.per_sample_loss()
            if feat is not None:
                feat = feat[:n]
                parts["feature_kd"] = feat.mean()
                total = total + self.lo.feature_kd * self._scaled(feat, task)
        if m:
            g_kd = per_sample_mse(s_out[:m].float() - s_all[n:].float(), t_out[:m].float() - t_all[n:].float())
            parts["guidance_kd"] = g_kd.mean()
            g_term = self.lo.guidance_kd * self._scaled(g_kd, task[:m])
            total = torch.cat([total[:m] + g_term, total[m:]])
        logged = {k: v.detach() for k, v in parts.items()}
        if self.skipper is not None:
            logged["skipped"] = None
        return total.mean(), logged

    def guidance_rows(self, n: int) -> int:
        """How many of a batch of ``n`` the guidance KD runs again with the empty prompt (0 when it is off)."""
        return max(1, round(self.lo.guidance_fraction * n)) if self.lo.guidance_kd > 0 else 0

    def loss(self, step: int, info: DistInfo):
        s, host = self.draw(step, info)
        loss, parts = self.loss_from(s)
        return loss, {k: host[k] if v is None else v for k, v in parts.items()}

    def draw_skips(self, step: int) -> tuple[list[str], torch.Tensor]:
        """The blocks robust training skips at ``step`` (the step's seeded generator, so every DDP rank and a
        resumed run draw the same), counted in ``skip_counts``, and their gate vector."""
        names, skip = self.gates.draw(step_generator(self.train_o.seed, step, stream=1))
        for name in names:
            self.skip_counts[name] = self.skip_counts.get(name, 0) + 1
        return names, skip

    def optimizer_step(self, opt: torch.optim.Optimizer):
        """Around ``opt.step()``: undo the step for the blocks this step skipped (snapopt.train.robust.SkipGates)."""
        return self.gates.frozen(opt, self._skip) if self.gates is not None and self._skip is not None else nullcontext()

    def _scaled(self, kd: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        if not self.lo.timestep_scaling:
            return kd
        return kd * (task.detach() / kd.detach().clamp_min(1e-12))

    def close(self) -> None:
        if self.matcher is not None:
            self.matcher.close()
