"""Step distillation as SnapFusion does it (issue 11): a v-prediction student from an epsilon teacher, its
re-expression warm-up, a teacher that is itself step-distilled first, and a saved pipeline that plain
diffusers samples correctly. Tiny models only (seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def _train(**kw):
    from snapopt.train.options import TrainOptions

    base = dict(steps=4, batch=2, progress=False, optim=dict(lr=1e-3), data=dict(source="random"))
    base.update(kw)
    return TrainOptions(**base)


def _as_v(pipe):
    """``pipe`` with its UNet read as a v-prediction model (the numbers do not matter for sampler checks)."""
    from snapopt.train.step_distill import set_prediction_type

    v = pipe.clone(["unet"])
    set_prediction_type(v, "v_prediction")
    return v


def test_v_student_target_is_one_diffusers_v_step_onto_the_teacher(tiny_pipe):
    """The v student's target, stepped once by diffusers' DDIM with prediction_type v_prediction, lands where the
    epsilon teacher's two steps did; its x_0 is SnapFusion's x_hat = alpha_t z_t - sigma_t v_hat."""
    from diffusers import DDIMScheduler

    from snapopt.train.options import StepDistillLoss
    from snapopt.train.step_distill import StepDistillObjective

    obj = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8, student_prediction="v_prediction"),
                               device=CPU)
    assert obj.sched.prediction_type == "epsilon" and obj.ssched.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(0)
    x_t, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([751, 251])
    x_end = obj.teacher_walk(x_t, t, cond, cond)
    v = obj.student_target(x_t, t, x_end)
    one = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    one.set_timesteps(4)
    for i, tt in enumerate((751, 251)):
        torch.testing.assert_close(one.step(v[i:i + 1], tt, x_t[i:i + 1]).prev_sample, x_end[i:i + 1], rtol=1e-4, atol=1e-5)
    ab = obj.ssched.alpha_bar(t).float().view(-1, 1, 1, 1)
    x0, _ = obj.ssched.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(x0, ab.sqrt() * x_t - (1 - ab).sqrt() * v)
    # the truncated-SNR error is the same x_0 error whichever way the outputs are parametrised
    eps_obj = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8), device=CPU)
    pred_eps = torch.randn_like(x_t)
    pred_v = obj.ssched.from_x0(eps_obj.sched.to_x0_eps(pred_eps, x_t, t)[0], x_t, t)
    torch.testing.assert_close(obj.distill_error(pred_v, v, x_t, t),
                               eps_obj.distill_error(pred_eps, eps_obj.student_target(x_t, t, x_end), x_t, t), rtol=1e-3, atol=1e-6)


def test_saved_v_pipeline_samples_the_same_in_plain_diffusers(tiny_pipe, tmp_path):
    """A pipeline switched to v carries it in its saved scheduler config; diffusers' DDIMScheduler built from that
    config, with CFG, reproduces the project's sampler step for step."""
    from diffusers import DDIMScheduler

    from snapopt.serialization import load, save
    from snapopt.train.evaluation import diffusers_pipeline
    from snapopt.train.sampling import sample_latents

    v = _as_v(tiny_pipe)
    assert tiny_pipe.prediction_type == "epsilon" and tiny_pipe.scheduler.config.prediction_type == "epsilon"  # untouched
    save(v, tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.prediction_type == "v_prediction"
    sched = DDIMScheduler.from_pretrained(tmp_path / "m" / "scheduler")
    assert sched.config.prediction_type == "v_prediction"
    assert diffusers_pipeline(again).scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 77, 32, generator=gen), torch.randn(77, 32, generator=gen)
    ours = sample_latents(again, cond, uncond, steps=4, cfg=5.0, shape=(4, 8, 8), seed=7, device=CPU)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sched.set_timesteps(4)
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((4,), int(t))
            u, c = again.unet(torch.cat([x, x]), tt, torch.cat([uncond.expand_as(cond), cond])).sample.chunk(2)
            x = sched.step(u + 5.0 * (c - u), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    # read as epsilon, the same UNet draws something else: the config is what makes it right
    eps = sample_latents(tiny_pipe, cond, uncond, steps=4, cfg=5.0, shape=(4, 8, 8), seed=7, device=CPU, unet=again.unet)
    assert (eps - ours).norm() > 0.1 * ours.norm()


def test_reparametrise_warmup_keeps_what_the_student_draws(tiny_pipe):
    """Read as v, the epsilon weights draw something far from the model's own samples; a short re-expression
    warm-up on its own converted outputs brings its outputs and samples back towards them. (The tiny model is
    untrained: its epsilon at high noise, divided by alpha_t ~ 0.07 in the v target, is hard to fit, so the
    margins here are modest; docs/training.md has the zoo model's numbers.)"""
    from snapopt.train import Trainer
    from snapopt.train.evaluation import sample_distance
    from snapopt.train.step_distill import ReparamObjective, snr_trunc_error

    student = _as_v(tiny_pipe)
    kw = dict(prompts=4, cfg=3.0, seed=0, device=CPU)
    o = _train(steps=80, batch=8, optim=dict(lr=2e-3))
    obj = ReparamObjective(tiny_pipe, student.unet, o, source_prediction="epsilon", target_prediction="v_prediction", device=CPU,
                           reference_unet=tiny_pipe.unet)
    gen = torch.Generator().manual_seed(5)
    x0, noise, cond = torch.randn(32, 4, 8, 8, generator=gen), torch.randn(32, 4, 8, 8, generator=gen), torch.randn(32, 77, 32, generator=gen)
    t = torch.linspace(0, 999, 32).long()

    @torch.no_grad()
    def error():
        x_t = obj.src.add_noise(x0, noise, t)
        return snr_trunc_error(obj.dst, student.unet(x_t, t, cond).sample, obj.target(x_t, t, cond), x_t, t).mean().item()

    start, start_err = sample_distance(tiny_pipe, student, 4, 4, **kw), error()
    Trainer(obj, o, None).run()
    student.unet.eval()
    after, after_err = sample_distance(tiny_pipe, student, 4, 4, **kw), error()
    assert after < 0.7 * start, (start, after)
    assert after_err < 0.6 * start_err, (start_err, after_err)


def test_split_and_halved_grids():
    from snapopt.train.sampling import ddim_transitions, halved_transitions, split_transitions, student_transitions

    assert split_transitions(ddim_transitions(8)) == halved_transitions(8)
    assert student_transitions(16, "halved") == halved_transitions(8)
    assert student_transitions(8, "ddim") == ddim_transitions(8)
    # the 32 -> 16 teacher's teacher splits the halved 8-step path once more
    assert split_transitions(halved_transitions(8))[:3] == [(876, 845), (845, 814), (814, 783)]


def test_pass_distils_the_teacher_first_and_leaves_a_v_pipeline(tiny_pipe, tiny_shapes, tmp_path):
    """teacher_distill 8 -> 4 on a copy of the teacher, then the student 4 -> 2 from it, as v-prediction: the
    program leaves saying v_prediction (schedulers included), the teacher is unchanged, the report says so."""
    from snapopt.core import PassContext, PassManager
    from snapopt.passes.recover import StepDistill

    tr = {"steps": 2, "batch": 2, "progress": False, "optim": {"lr": 1e-5}, "data": {"source": "random"}}
    warm = {**tr, "optim": {"lr": 1e-4}}
    opts = {"train": tr, "eval_prompts": 1, "reparametrise": warm,
            "loss": {"teacher_steps": 4, "cfg_probability": 0.5, "student_prediction": "v_prediction"},
            "teacher_distill": {"train": tr, "reparametrise": warm,
                                "loss": {"teacher_steps": 8, "grid": "halved", "student_prediction": "v_prediction"}}}
    ctx = PassContext(shapes=tiny_shapes, work_dir=tmp_path, teacher=tiny_pipe)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    out, records = PassManager([StepDistill(opts)], ctx).run(tiny_pipe)
    assert out.prediction_type == "v_prediction" and out.scheduler.config.prediction_type == "v_prediction"
    assert tiny_pipe.prediction_type == "epsilon" and tiny_pipe.scheduler.config.prediction_type == "epsilon"
    assert all(torch.equal(v, tiny_pipe.unet.state_dict()[k]) for k, v in before.items())
    stats = records[0].stats
    td = stats["teacher_distill"]
    assert (td["teacher_steps"], td["student_steps"], td["grid"], td["student_prediction"]) == (8, 4, "halved", "v_prediction")
    assert stats["teacher_prediction"] == "v_prediction" and stats["reparametrise"]["from"] == "epsilon"
    assert (tmp_path / "step_distill-0" / "teacher" / "checkpoints").is_dir()
    assert (tmp_path / "step_distill-0" / "reparametrise" / "checkpoints").is_dir()
    lines = "\n".join(ctx.report["sections"][-1]["lines"])
    assert "step-distilled 8 → 4 first" in lines and "| student prediction type | v_prediction |" in lines


def test_bad_stage_options_are_one_line_errors(tiny_pipe):
    from pydantic import ValidationError

    from snapopt.errors import UsageError
    from snapopt.train.jobs import StepDistillJob, run_step_distill
    from snapopt.train.options import StepDistillLoss

    with pytest.raises(ValidationError, match="2 x loss.teacher_steps"):
        StepDistillJob(loss={"teacher_steps": 16}, teacher_distill={"loss": {"teacher_steps": 16, "grid": "halved"}})
    with pytest.raises(ValidationError, match="must be halved"):
        StepDistillJob(loss={"teacher_steps": 16}, teacher_distill={"loss": {"teacher_steps": 32}})
    with pytest.raises(ValidationError, match="divisible by 4"):
        StepDistillLoss(teacher_steps=6, grid="halved")
    job = StepDistillJob(train=_train(steps=1), loss={"teacher_steps": 4, "student_prediction": "v_prediction"}, eval_prompts=1)
    with pytest.raises(UsageError, match="give `reparametrise`"):
        run_step_distill(tiny_pipe, tiny_pipe.clone(["unet"]), job, None)


def test_recipe_takes_snapfusions_chain_of_teachers():
    """recipes/snapfusion-train.yaml with its step_distill stage switched to SnapFusion's variant (a 32 -> 16
    step-distilled v teacher, then the student 16 -> 8 as v, both re-expressed first) validates as a recipe."""
    import copy

    from snapopt.checks.files import load_yaml_file
    from snapopt.recipe import validate_recipe

    data = load_yaml_file(ROOT / "recipes" / "snapfusion-train.yaml", "recipe")
    stage = [p for p in data["passes"] if p["pass"] == "step_distill"][0]["options"]
    warm = {**stage["train"], "steps": 1000, "optim": {"lr": 2.0e-4, "schedule": "cosine", "warmup_steps": 50}}
    stage["reparametrise"] = warm
    loss = {k: v for k, v in stage["loss"].items() if k != "student_steps"}  # the recipe's direct 48 -> 8 becomes 16 -> 8
    stage["loss"] = {**loss, "teacher_steps": 16, "student_prediction": "v_prediction"}
    stage["teacher_distill"] = {"train": copy.deepcopy(stage["train"]), "reparametrise": warm,
                                "loss": {**stage["loss"], "teacher_steps": 32, "grid": "halved"}}
    sd = [p for p in validate_recipe(data, check_model=False).passes if p.name == "step_distill"][0].options
    assert sd.loss.student_prediction == "v_prediction" and sd.loss.teacher_steps == 16 and sd.reparametrise.steps == 1000
    td = sd.teacher_distill
    assert td.loss.teacher_steps == 32 and td.loss.grid == "halved" and td.loss.student_prediction == "v_prediction"


def test_epsilon_output_re_expresses_a_v_unet_exactly(tiny_pipe):
    """What an epsilon-only runtime (Apple's Swift schedulers) needs from a v student: the same UNet, outputting
    epsilon, equal to the epsilon its v implies; diffusers' epsilon DDIM on it matches v DDIM on the bare UNet."""
    from diffusers import DDIMScheduler

    from snapopt.train.diffusion import EpsilonOutput, Schedule

    wrapped = EpsilonOutput(tiny_pipe.unet, tiny_pipe.scheduler.alphas_cumprod, "v_prediction")
    gen = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([876, 1])
    with torch.no_grad():
        v = tiny_pipe.unet(x, t, cond).sample
        eps = wrapped(x, t.float(), cond, return_dict=False)[0]
        assert torch.equal(wrapped(x, t, cond).sample, eps)
    torch.testing.assert_close(eps, Schedule(tiny_pipe.scheduler, "v_prediction").to_x0_eps(v, x, t)[1], rtol=1e-5, atol=1e-5)
    as_v = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction")
    as_eps = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    for s in (as_v, as_eps):
        s.set_timesteps(8)
    torch.testing.assert_close(as_eps.step(eps[:1], 876, x[:1]).prev_sample, as_v.step(v[:1], 876, x[:1]).prev_sample, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not 'epsilon'"):
        EpsilonOutput(tiny_pipe.unet, tiny_pipe.scheduler.alphas_cumprod, "epsilon")


def test_teacher_distance_compares_a_v_student_as_epsilon(tiny_pipe, tiny_shapes):
    """The report's teacher distance reads every UNet as epsilon: the teacher's own function, output as v, is at
    distance ~0 from it (raw outputs would be far apart)."""
    from snapopt.quality import TeacherDistance
    from snapopt.train.diffusion import Schedule

    class AsV(torch.nn.Module):
        def __init__(self, unet, scheduler):
            super().__init__()
            self.unet, self.config = unet, unet.config
            self.eps, self.v = Schedule(scheduler, "epsilon"), Schedule(scheduler, "v_prediction")

        def forward(self, x, t, cond, return_dict=False):
            eps = self.unet(x, t, cond, return_dict=False)[0]
            return (self.v.from_x0(self.eps.to_x0_eps(eps, x, t)[0], x, t),)

    v = _as_v(tiny_pipe)
    v.unet = AsV(tiny_pipe.unet, tiny_pipe.scheduler)
    metric = TeacherDistance.prepare(tiny_pipe, latent=tiny_shapes.latent(tiny_pipe), prompts=2)
    assert metric.score(v) < 1e-3
    v.prediction_type = "epsilon"  # the same outputs read raw
    assert metric.score(v) > 0.1
