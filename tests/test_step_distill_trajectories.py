"""Step distillation on the teacher's own sampling trajectories (``loss.trajectory_probability``): the pool
holds what the teacher's sampler walks from pure noise, its targets are the teacher's two steps, and steps
drawn from it train and resume like data steps. Tiny models only (seconds)."""

from __future__ import annotations

import torch

CPU = torch.device("cpu")


def _train(**kw):
    from snapopt.train.options import TrainOptions

    base = dict(steps=4, batch=4, progress=False, optim=dict(lr=1e-3), data=dict(source="random"))
    base.update(kw)
    return TrainOptions(**base)


def _objective(pipe, unet=None, **loss):
    from snapopt.train.options import StepDistillLoss
    from snapopt.train.step_distill import StepDistillObjective

    lo = StepDistillLoss(**{"teacher_steps": 8, "trajectory_pool": 6, **loss})
    return StepDistillObjective(pipe, unet or pipe.clone(["unet"]).unet, _train(), lo, device=CPU)


def test_pool_is_the_teachers_guided_sampler_walk(tiny_pipe):
    """Each trajectory's last state is the teacher's x_0 from an independent sampler (sample_latents on the
    halved path, same noise, prompt and scale), and every state is two teacher steps after the one before."""
    from snapopt.train.sampling import sample_latents, split_transitions

    obj = _objective(tiny_pipe, cfg_range=(5.0, 5.0))
    pools = obj.trajectory_pools()
    guided, plain = pools[True], pools[False]
    assert guided.states.shape[:2] == (6, len(obj.transitions) + 1) and plain.scale is None
    gen = torch.Generator().manual_seed(obj.train_o.seed + 7919 + 1)  # the guided pool's own draws, in order
    prompt = torch.randint(0, len(obj.data.cond_bank), (6,), generator=gen)
    assert torch.equal(prompt, guided.prompt)
    torch.rand(6, generator=gen)
    noise = torch.randn(6, *obj.data.shape, generator=gen)
    assert torch.equal(guided.states[:, 0], noise)
    cond = obj.data.cond_bank[prompt]
    t, t_end = obj.transitions[2]
    k = 2
    step = obj.teacher_walk(guided.states[:, k], torch.full((6,), t), cond, obj.data.uncond.expand_as(cond),
                                 guided.scale, torch.full((6,), t_end))
    torch.testing.assert_close(step.float(), guided.states[:, k + 1], rtol=1e-5, atol=1e-6)
    # the walk as a whole, against the independent sampler started from the pool's noise
    ref = sample_latents(tiny_pipe, cond, obj.data.uncond, steps=8, cfg=5.0, shape=obj.data.shape, seed=0, device=CPU,
                         transitions=split_transitions(obj.transitions), noise=noise)
    torch.testing.assert_close(guided.states[:, -1], ref, rtol=1e-4, atol=1e-5)


def test_trajectory_steps_target_the_next_state_and_need_no_data(tiny_pipe):
    """A trajectory step's tensors come from the pool; its target state is the pool's next state; the loss
    is finite and has no denoising term (there is no data behind x_t)."""
    obj = _objective(tiny_pipe, trajectory_probability=1.0, cfg_probability=0.5, original_weight=0.1)
    kinds = set()
    for step in range(6):
        key, s, host = obj.draw(step, _info())
        assert key[1] and host["trajectory"] == 1.0 and "x0" not in s
        kinds.add(key[0])
        loss, parts = obj.loss(step, _info())
        assert torch.isfinite(loss) and "original" not in parts and parts["trajectory"] == 1.0
    assert kinds == {True, False}


def test_probability_zero_draws_what_it_drew_before(tiny_pipe):
    """trajectory_probability 0 adds no draw to the step's generator: existing runs keep their samples."""
    from snapopt.train.dist import step_generator

    obj = _objective(tiny_pipe, cfg_probability=0.5)
    for step in range(4):
        key, s, _ = obj.draw(step, _info())
        gen = step_generator(obj.train_o.seed, step, stream=2)
        k = torch.randint(0, len(obj.grid), (4,), generator=gen)
        use_cfg = bool(torch.rand((), generator=gen) < 0.5)
        assert key == (use_cfg, False) and torch.equal(s["t"], obj.grid[k])
    assert obj._pools is None  # never built


def test_trajectory_training_moves_the_student_onto_the_teacher_path(tiny_pipe):
    """Training on trajectory states lowers the error on held-out draws of them (steps the run never took).
    At lr 1e-5, like the recipe: at 1e-4 this tiny student overshoots (docs/training.md)."""
    from snapopt.train import Trainer

    unet = tiny_pipe.clone(["unet"]).unet
    obj = _objective(tiny_pipe, unet, trajectory_probability=1.0, trajectory_pool=16)
    obj.train_o = obj.train_o.model_copy(update={"steps": 12, "batch": 8, "optim": obj.train_o.optim.model_copy(update={"lr": 1e-5})})

    def held_out() -> float:
        with torch.no_grad():
            return sum(obj.loss(s, _info())[0].item() for s in range(100, 108)) / 8

    before = held_out()
    Trainer(obj, obj.train_o, None, device=CPU).run()
    assert held_out() < 0.8 * before


def test_trainer_builds_the_pools_before_its_clock_starts(tiny_pipe, monkeypatch):
    """The trainer asks the objective to prepare its pools before timing steps, so a pass's training seconds and
    images/s count training, and the pools show as their own phase (built lazily, they fell into the first step)."""
    from snapopt.core.phases import recording
    from snapopt.train import Trainer

    obj = _objective(tiny_pipe, trajectory_probability=1.0, trajectory_pool=8)
    built_at_draw = []
    real_draw = obj.draw
    monkeypatch.setattr(obj, "draw", lambda step, info: built_at_draw.append(obj._pools is not None) or real_draw(step, info))
    with recording() as phases:
        Trainer(obj, obj.train_o, None, device=CPU).run()
    assert built_at_draw and all(built_at_draw)
    assert phases["trajectory pool"] > 0 and "train" in phases
    lazy = _objective(tiny_pipe, trajectory_probability=1.0, trajectory_pool=8)
    lazy.draw(0, _info())  # the old way: built on the first draw
    assert all(torch.equal(lazy.trajectory_pools()[k].states, obj.trajectory_pools()[k].states) for k in (True, False))


def _info():
    from snapopt.train.dist import DistInfo

    return DistInfo()


def test_report_shows_the_distance_on_the_zoo_prompts_when_measured():
    """A zoo teacher's step_distill report row pairs before → after on the held-out captions; others have none."""
    from snapopt.passes.recover import StepDistill

    p = StepDistill({"train": {"steps": 1, "batch": 2}, "loss": {"teacher_steps": 4}})
    stats = {"teacher_steps": 16, "student_steps": 8, "distance_before": 0.36, "distance_after": 0.58, "teacher_at_half_steps": 0.4,
             "distance_halved_before": 0.32, "distance_halved_after": 0.57, "steps": 300, "images_per_second": 1.0}
    _, rows = p.report_rows(stats)
    assert not any("held-out prompts" in str(label) for label, _ in rows)
    stats.update(distance_zoo_prompts_before=0.2175, distance_zoo_prompts_after=0.1672,
                 distance_zoo_prompts_halved_before=0.2020, distance_zoo_prompts_halved_after=0.1540)
    _, rows = p.report_rows(stats)
    zoo = {label: value for label, value in rows if "held-out prompts" in str(label)}
    assert len(zoo) == 2 and any("0.2175 → 0.1672" in str(v) or "0.217 → 0.167" in str(v) for v in zoo.values()), zoo


def test_direct_distillation_walks_the_finer_teacher_solve(tiny_pipe):
    """loss.student_steps below N/2 (direct 16 -> 4 here): each student step is m = 4 teacher steps. The pool's
    walk equals an independent sampler on the student's grid split in four (the last step stays whole below
    t = 0), one pool step equals ``teacher_walk``, and the student's target lands on the next state."""
    from snapopt.train.sampling import ddim_transitions, sample_latents, split_transitions

    obj = _objective(tiny_pipe, teacher_steps=16, student_steps=4, cfg_range=(5.0, 5.0))
    assert obj.student_steps == 4 and obj.substeps == 4 and obj.transitions == ddim_transitions(4)
    path = split_transitions(obj.transitions, 4)
    assert path[:4] == [(751, 689), (689, 626), (626, 564), (564, 501)] and path[-1] == (1, -249)
    guided = obj.trajectory_pools()[True]
    cond = obj.data.cond_bank[guided.prompt]
    uncond = obj.data.uncond.expand_as(cond)
    ref = sample_latents(tiny_pipe, cond, obj.data.uncond, steps=16, cfg=5.0, shape=obj.data.shape, seed=0, device=CPU,
                         transitions=path, noise=guided.states[:, 0])
    torch.testing.assert_close(guided.states[:, -1], ref, rtol=1e-4, atol=1e-5)
    t, t_end = obj.transitions[1]
    tt, te = torch.full((6,), t), torch.full((6,), t_end)
    walked = obj.teacher_walk(guided.states[:, 1], tt, cond, uncond, guided.scale, te)
    torch.testing.assert_close(walked.float(), guided.states[:, 2], rtol=1e-5, atol=1e-6)
    # the target: one student DDIM step from state 1 reaches state 2
    target = obj.student_target(guided.states[:, 1], tt, guided.states[:, 2], te)
    landed = obj.ssched.ddim_step(target.double(), guided.states[:, 1].double(), tt, te)
    torch.testing.assert_close(landed.float(), guided.states[:, 2], rtol=1e-4, atol=1e-5)


def test_student_steps_must_divide_the_teachers():
    import pytest
    from pydantic import ValidationError

    from snapopt.train.options import StepDistillLoss, student_step_count

    assert student_step_count(StepDistillLoss(teacher_steps=16)) == 8
    assert student_step_count(StepDistillLoss(teacher_steps=48, student_steps=8)) == 8
    for bad in (dict(teacher_steps=32, student_steps=12), dict(teacher_steps=16, student_steps=16),
                dict(teacher_steps=32, student_steps=8, grid="halved")):
        with pytest.raises(ValidationError, match="student_steps"):
            StepDistillLoss(**bad)
