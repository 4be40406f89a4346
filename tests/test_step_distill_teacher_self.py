"""``step_distill.teacher: self``: the UNet as it enters the pass teaches itself (SnapFusion's option when the
pruned, recovered UNet is better than the original at the teacher's step count). Tiny models only (seconds)."""

from __future__ import annotations

import torch


def _job(teacher: str, **loss):
    from snapopt.train.jobs import StepDistillJob

    return StepDistillJob(teacher=teacher, eval_prompts=2,
                          train=dict(steps=1, batch=2, progress=False, optim=dict(lr=1e-4, warmup_steps=0), data=dict(source="random")),
                          loss=dict(teacher_steps=4, **loss))


def _entering(tiny):
    """A UNet that no longer equals the loaded teacher's, as after pruning and recovery."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tiny.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tiny


def test_self_teacher_is_the_entering_unet(tiny_pipe, tiny):
    """Before training, the student *is* its teacher under ``self``: its half-step samples are exactly the
    teacher's own half-step samples, so the two distances the pass reports coincide. With the original teacher
    they do not (the student was changed), which shows the option picks a different teacher."""
    from snapopt.train.jobs import run_step_distill

    own, _ = run_step_distill(tiny_pipe, _entering(tiny), _job("self"), None)
    assert own["distance_before"] == own["teacher_at_half_steps"]
    other, _ = run_step_distill(tiny_pipe, _entering(tiny_pipe.clone()), _job("original"), None)
    assert abs(other["distance_before"] - other["teacher_at_half_steps"]) > 1e-3


def test_self_teacher_trains_on_its_own_trajectories(tiny_pipe, tiny):
    """Trajectory steps (the pool walked by the entering UNet's copy) train under ``self``: the student moves,
    and with it its distance to the teacher."""
    from snapopt.train.jobs import run_step_distill

    student = _entering(tiny)
    start = {k: v.clone() for k, v in student.unet.state_dict().items()}
    stats, _ = run_step_distill(tiny_pipe, student, _job("self", trajectory_probability=1.0, trajectory_pool=4), None)
    moved = any(not torch.equal(start[k], v) for k, v in student.unet.state_dict().items())
    assert moved and stats["distance_after"] != stats["distance_before"]
