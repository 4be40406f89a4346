"""Recovery trainer: losses, feature map, robust skipping, step/decoder distillation math, resume, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import BK_SMALL, BK_TINY



CPU = torch.device("cpu")


def _train(**kw):
    from snapopt.train import TrainOptions

    base = dict(steps=4, batch=2, progress=False, optim=dict(lr=1e-3))
    base.update(kw)
    return TrainOptions(**base)


def _bk_student(pipe, blocks=BK_SMALL, log=False):
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.serialization import record_edit

    student = pipe.clone(["unet"])
    opts = {"component": "unet", "blocks": blocks}
    RemoveBlocks(opts).run(student, None)
    if log:
        record_edit(student.unet, "remove_blocks", opts)
    return student


def test_recover_loss_decreases_on_fixed_batch(tiny_pipe):
    from snapopt.train import RecoverLoss, Trainer
    from snapopt.train.recover import RecoverObjective

    student = _bk_student(tiny_pipe)
    o = _train(steps=6, data=dict(fixed_batch=True))
    obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(), device=CPU)
    hist = Trainer(obj, o, None).run().history
    obj.close()
    assert {"task", "output_kd", "feature_kd"} <= set(hist[0])
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]


def test_feature_map_survives_block_removal(tiny_pipe):
    from snapopt.train.features import FeatureMatcher, stage_map

    small = _bk_student(tiny_pipe)
    pairs = stage_map(tiny_pipe.unet, small.unet)
    assert pairs == {f"{k}_blocks.{i}": f"{k}_blocks.{i}" for k in ("down", "up") for i in range(4)}  # no mid block in BK-SDM-Small
    tiny = _bk_student(tiny_pipe, BK_TINY, log=True)  # stage 3 gone: up_blocks re-indexed
    pairs = stage_map(tiny_pipe.unet, tiny.unet)
    assert pairs == {"down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.1", "down_blocks.2": "down_blocks.2",
                     "up_blocks.0": "up_blocks.1", "up_blocks.1": "up_blocks.2", "up_blocks.2": "up_blocks.3"}
    m = FeatureMatcher(tiny_pipe.unet, tiny.unet)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        tiny_pipe.unet(x, t, c)
        tiny.unet(x, t, c)
    loss = m.per_sample_loss()
    m.close()
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    # BK-SDM-Tiny also drops down_blocks.2's downsampler: that stage's output no longer matches, and says so
    assert list(m.dropped) == ["down_blocks.2"] and "vs teacher" in m.dropped["down_blocks.2"]


def test_robust_training_skips_blocks(tiny_pipe):
    """A skipped block hands on its input (gated: snapopt.train.robust.SkipGates): with p=1 the student's output
    is the structurally skipped model's, with p=0 the whole model's; the model is left as it was."""
    from snapopt.models.skipping import skip_blocks, skippable_blocks
    from snapopt.train import RecoverLoss, RobustOptions
    from snapopt.train.dist import DistInfo
    from snapopt.train.recover import RecoverObjective

    student = tiny_pipe.clone(["unet"])
    attn = [n for n, k in skippable_blocks(student.unet).items() if k == "attention"]
    hooks_before = [len(m._forward_hooks) for m in student.unet.modules()]  # the shared fixture may carry others' hooks
    seen = []
    hook = student.unet.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out[0].detach())), with_kwargs=True)
    o = _train()
    for p, skipped in ((1.0, attn), (0.0, [])):
        obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(output_kd=0, feature_kd=0), RobustOptions(attention=p) if p else RobustOptions(),
                               device=CPU)
        seen.clear()
        logged = obj.loss(0, DistInfo())[1]
        args, kwargs, got = seen[0]
        assert logged.get("skipped", 0.0) == len(skipped)
        with torch.no_grad(), skip_blocks(student.unet, skipped):
            want = student.unet(*args, **kwargs)[0]
        assert torch.equal(got, want)
    hook.remove()
    # the model is whole again afterwards, and no gate is left on it
    assert all(type(student.unet.get_submodule(n)).__name__ == "Transformer2DModel" for n in attn)
    assert [len(m._forward_hooks) for m in student.unet.modules()] == hooks_before
    # partial probability: the count logged matches a draw, and differs across steps
    obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(output_kd=0, feature_kd=0), RobustOptions(attention=0.5), device=CPU)
    counts = [obj.loss(s, DistInfo())[1]["skipped"] for s in range(3)]
    assert 0 < sum(counts) < 3 * len(attn)


class _BlowsUp:
    """An objective whose loss turns NaN at a given step (to test that the trainer stops before saving)."""

    name, skips_blocks = "blowup", False

    def __init__(self, at: int):
        self.at, self.lin = at, torch.nn.Linear(2, 1)
        self.forward_model = self.lin

    def trainable(self):
        return self.lin

    def loss(self, step, info):
        out = self.forward_model(torch.ones(1, 2)).sum()
        out = out * float("nan") if step >= self.at else out
        return out, {"raw": out.detach(), "count": 1.0}


def test_every_step_is_logged_and_nan_stops_before_a_checkpoint(tmp_path):
    from snapopt.train import Trainer

    hist = Trainer(_BlowsUp(at=10**6), _train(steps=120), None).run().history
    assert [r["step"] for r in hist] == list(range(120)) and hist[5]["count"] == 1.0
    with pytest.raises(FloatingPointError, match="step 7"):
        Trainer(_BlowsUp(at=7), _train(steps=40, checkpoint_every=10), tmp_path).run()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_loss_log_is_on_disk_before_the_checkpoint_that_covers_it(tmp_path, monkeypatch):
    """A kill during (or right after) a checkpoint write must not lose the losses of the steps it covers."""
    from snapopt.train import Trainer, checkpoint, logs

    seen = []

    def killed_while_writing(root, step, **kw):
        seen.append((step, [r["step"] for r in logs.read_csv(tmp_path / "losses.csv")]))
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_BlowsUp(at=10**6), _train(steps=40, checkpoint_every=10), tmp_path).run()
    assert seen == [(10, list(range(10)))]
    assert not list(tmp_path.glob(".losses.csv.tmp"))  # written atomically: no partial file left behind


def test_resume_is_exact(tiny_pipe, tmp_path):
    from snapopt.train import RecoverLoss, RobustOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    o = _train(steps=4, checkpoint_every=2, ema=0.5, optim=dict(lr=1e-3, schedule="cosine", warmup_steps=1), shard_mb=0.2)
    robust = RobustOptions(attention=0.3, resnet=0.2)

    def run(folder, until=None, resume=False):
        student = tiny_pipe.clone(["unet"])
        obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(), robust, device=CPU)
        res = Trainer(obj, o, folder).run(resume=resume, until=until)
        obj.close()
        return student.unet.state_dict(), res

    straight, full = run(tmp_path / "a")
    run(tmp_path / "b", until=3)  # killed after step 3; last checkpoint at step 2
    resumed, res = run(tmp_path / "b", resume=True)
    assert res.resumed_from == 2 and res.steps == 2
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["loss"] for r in full.history] == [r["loss"] for r in res.history]
    ck = sorted((tmp_path / "b" / "checkpoints").iterdir())[-1]
    assert len(list(ck.glob("model-*.safetensors"))) > 1  # sharded under shard_mb
    assert (tmp_path / "b" / "losses.csv").is_file() and (tmp_path / "b" / "losses.png").is_file()


def test_resume_accepts_a_checkpoint_from_before_an_option_existed(tiny_pipe, tmp_path):
    """A checkpoint written before an option was added (here data.prompt_set) resumes when the option is at its
    default, what the older version did; set to something else, it is another job and is refused."""
    import json

    from snapopt.errors import UsageError
    from snapopt.train import RecoverLoss, Trainer
    from snapopt.train.recover import RecoverObjective

    def run(o, resume=False, until=None):
        student = tiny_pipe.clone(["unet"])
        obj = RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(), device=CPU)
        try:
            return Trainer(obj, o, tmp_path).run(resume=resume, until=until)
        finally:
            obj.close()

    o = _train(steps=4, checkpoint_every=2)
    run(o, until=3)
    meta_file = sorted((tmp_path / "checkpoints").iterdir())[-1] / "trainer.json"
    meta = json.loads(meta_file.read_text())
    del meta["job"]["options"]["data"]["prompt_set"]  # as an older snapopt wrote it
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="different job or options"):
        run(_train(steps=4, checkpoint_every=2, data=dict(prompt_set="validation")), resume=True)
    with pytest.raises(UsageError, match="different job or options"):
        run(_train(steps=4, checkpoint_every=2, seed=1), resume=True)  # an option both know, changed
    assert run(o, resume=True).resumed_from == 2


def test_new_option_defaults_are_dropped_only_where_the_checkpoint_lacks_them():
    from snapopt.train.trainer import _without_new_defaults

    defaults = {"a": 1, "new": 0, "group": {"x": 1, "new_in_group": "auto"}, "new_group": {"y": 2}}
    theirs = {"a": 5, "group": {"x": 3}}
    mine = {"a": 5, "new": 0, "group": {"x": 3, "new_in_group": "auto"}, "new_group": {"y": 2}}
    assert _without_new_defaults(mine, theirs, defaults) == theirs
    changed = {**mine, "new": 1, "group": {"x": 3, "new_in_group": "validation"}}
    assert _without_new_defaults(changed, theirs, defaults) == {"a": 5, "new": 1, "group": {"x": 3, "new_in_group": "validation"}}


def test_step_distillation_target_is_two_teacher_ddim_steps(tiny_pipe):
    from diffusers import DDIMScheduler

    from snapopt.train import StepDistillLoss
    from snapopt.train.step_distill import StepDistillObjective

    obj = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8), device=CPU)
    assert obj.stride == 250
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([751, 751])
    x_end = obj.teacher_walk(x_t, t, cond, cond)
    # the same two steps with diffusers' DDIM at 8 steps (stride 125)
    ref = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    ref.set_timesteps(8)
    x = x_t
    with torch.no_grad():
        for tt in (751, 626):
            eps = tiny_pipe.unet(x, torch.tensor([tt, tt]), cond).sample
            x = ref.step(eps, tt, x).prev_sample
    torch.testing.assert_close(x_end, x, rtol=1e-4, atol=1e-5)
    # one student DDIM step (diffusers, 4 steps: stride 250) with the target output lands on the teacher's result
    target = obj.student_target(x_t, t, x_end)
    one = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    one.set_timesteps(4)
    torch.testing.assert_close(one.step(target, 751, x_t).prev_sample, x_end, rtol=1e-4, atol=1e-5)


def test_cfg_aware_guidance_math(tiny_pipe):
    from snapopt.train import StepDistillLoss
    from snapopt.train.diffusion import guided
    from snapopt.train.step_distill import StepDistillObjective

    u, c = torch.zeros(2, 3), torch.ones(2, 3)
    assert torch.equal(guided(u, c, 7.5), torch.full((2, 3), 7.5))
    assert torch.equal(guided(u, c, torch.tensor([1.0, 3.0])), torch.tensor([[1.0] * 3, [3.0] * 3]))
    obj = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8, cfg_probability=1.0), device=CPU)
    gen = torch.Generator().manual_seed(1)
    x, cond, unc = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([501, 251])
    torch.testing.assert_close(obj.teacher_walk(x, t, cond, unc, torch.tensor([1.0, 1.0])), obj.teacher_walk(x, t, cond, unc))
    w = torch.tensor([2.0, 9.0])
    with torch.no_grad():
        pu, pc = tiny_pipe.unet(x, t, unc).sample, tiny_pipe.unet(x, t, cond).sample
    torch.testing.assert_close(obj._teacher_pred(x, t, cond, unc, w), pu + w.view(2, 1, 1, 1) * (pc - pu), rtol=1e-4, atol=1e-5)
    # with probability 1 every step is CFG-aware and the student's guided output is what is trained
    loss, parts = obj.loss(0, __import__("snapopt.train.dist", fromlist=["DistInfo"]).DistInfo())
    assert parts["cfg"] == 1.0 and torch.isfinite(loss)


def test_decoder_distillation_improves_psnr(tiny_pipe):
    from snapopt.train import DecoderJob, run_decoder

    student = tiny_pipe.clone(["vae_decoder"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.vae.decoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    stats, _ = run_decoder(tiny_pipe, student, DecoderJob(train=_train(steps=8, batch=2), loss=dict(multiscale=0.5, val_latents=4)), None)
    assert stats["psnr_after_db"] > stats["psnr_before_db"] + 1.0


def test_decoder_job_scores_the_claim_with_both_decoders(monkeypatch, tiny_pipe, tmp_path, bench_module):
    """claim_prompts: after training, the pipeline is scored with its distilled decoder and with the teacher's (the same
    UNet), beside the teacher at 50 and 8 steps; bench/train_jobs_summary.py reads those rows back."""
    import json

    from snapopt.errors import UsageError
    from snapopt.train import DecoderJob, evaluation, run_decoder

    job = DecoderJob(train=_train(steps=2, batch=2, seed=1), loss=dict(val_latents=2), claim_prompts=3)
    with pytest.raises(UsageError, match="claim_prompts"):  # not a zoo model: refused before training
        run_decoder(tiny_pipe, tiny_pipe.clone(["vae_decoder"]), job, None)
    teacher = tiny_pipe.clone([])
    teacher.extra["origin"] = "zoo:snapshapes"  # scored as the zoo model's descendant
    student = teacher.clone(["vae_decoder"])
    with torch.no_grad():
        next(student.vae.decoder.parameters()).add_(0.05)
    seen = []

    def fake(pipe, n, steps, cfg, seed, grid=None):
        own = pipe.vae is student.vae
        seen.append((pipe.unet is student.unet, own, steps, n, grid.name if grid else None))
        assert seed == 0  # the claim's noise, whatever seed the job trained with
        return {"steps": steps, "n_prompts": n, "fid": 15.0 + own, "clip_score": 96.0, "attribute_accuracy": 0.9}

    monkeypatch.setattr(evaluation, "zoo_metrics", fake)
    stats, _ = run_decoder(teacher, student, job, tmp_path)
    rows = stats["claim"]["rows"]
    assert set(rows) == {"teacher_50", "teacher_8", "student_8", "student_8_teacher_decoder"}
    assert (True, True, 8, 3, "student_8.png") in seen and (True, False, 8, 3, "student_8_teacher_decoder.png") in seen
    assert rows["student_8"]["fid"] == 16.0 and not stats["claim"]["checks"]["fid"]  # the check uses the decoder it ships
    from snapopt.passes.recover import DecoderDistill

    report = dict(DecoderDistill({}).report_rows({**stats, "steps": 2, "images_per_second": 1.0})[1])
    assert report["this pipeline, 8 steps: FID / CLIP / attributes"] == "16.00 / 96.00 / 90.0%"
    assert report["this pipeline with the teacher decoder, 8 steps: FID / CLIP / attributes"] == "15.00 / 96.00 / 90.0%"
    n = len(seen)
    plain, _ = run_decoder(teacher, teacher.clone(["vae_decoder"]), DecoderJob(train=_train(steps=1, batch=2), loss=dict(val_latents=2)), None)
    assert "claim" not in plain and len(seen) == n  # off by default: no evaluation

    summary = bench_module("train_jobs_summary")
    (tmp_path / "result.json").write_text(json.dumps({"spec": {"job": "decoder_distill", "options": {}}, "stats": stats}))
    row = summary.summarise(tmp_path)
    assert row["zoo_teacher"]["steps"] == 50 and row["zoo_after"]["fid"] == 16.0 and row["claim"]["met"] is False
    assert row["psnr_after_db"] == stats["psnr_after_db"]


def test_bad_options_are_one_line_errors(tiny_pipe):
    from pydantic import ValidationError

    from snapopt.core import PassContext
    from snapopt.errors import UsageError
    from snapopt.passes.recover import Recover
    from snapopt.train import RecoverJob, RobustOptions, StepDistillLoss
    from snapopt.train.recover import RecoverObjective

    with pytest.raises(ValidationError, match="teacher_steps must be even"):
        StepDistillLoss(teacher_steps=7)
    with pytest.raises(ValidationError, match="warmup_steps"):
        RecoverJob(train=dict(steps=2, optim=dict(warmup_steps=5)))
    with pytest.raises(ValidationError, match="extra"):
        RecoverJob(train=dict(stpes=2))
    with pytest.raises(UsageError) as e:
        Recover({"train": {"steps": 1}}).run(tiny_pipe.clone(["unet"]), PassContext())
    assert "no teacher" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="robust.blocks: 'down_blocks.9.attentions.0'"):
        RecoverObjective(tiny_pipe, tiny_pipe.clone(["unet"]).unet, _train(), robust=RobustOptions(attention=1, blocks=["down_blocks.9.attentions.0"]),
                         device=CPU)
    from snapopt.train.data import LatentSource
    from snapopt.train.dist import DistInfo
    from snapopt.train.options import DataOptions

    src = LatentSource(tiny_pipe, DataOptions(), seed=0, device=CPU)
    with pytest.raises(UsageError, match="batch 3 does not split evenly over 2"):
        src.batch(0, 3, DistInfo(rank=0, world=2))


def test_ema_decay_warms_up_and_averages():
    from snapopt.train.ema import EMA

    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, 0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for step in range(200):
        ema.update(lin, step)
    # a fixed 0.999 would leave ~82% of the start (0.0) after 200 steps; the warm-up keeps < 10%
    assert ema.shadow["weight"].item() > 0.9


def test_halved_grid_is_the_path_step_distillation_trains_for(tiny_pipe):
    from snapopt.train.evaluation import sample_distance
    from snapopt.train.sampling import ddim_transitions, halved_transitions, sample_latents

    assert ddim_transitions(8)[:2] == [(876, 751), (751, 626)] and ddim_transitions(8)[-1] == (1, -124)
    halved = halved_transitions(8)
    assert len(halved) == 15 and halved[:2] == [(876, 814), (814, 751)] and halved[-1] == (1, -124)
    assert halved[0][0] != ddim_transitions(16)[0][0]  # diffusers' 16-step grid starts at 931, not 876
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(cfg=3.0, shape=(4, 8, 8), seed=0, device=CPU)
    by_steps = sample_latents(tiny_pipe, cond, cond[0], steps=4, **kw)
    by_pairs = sample_latents(tiny_pipe, cond, cond[0], steps=4, transitions=ddim_transitions(4), **kw)
    assert torch.equal(by_steps, by_pairs)
    d = dict(prompts=2, cfg=3.0, seed=0, device=CPU)
    assert sample_distance(tiny_pipe, tiny_pipe, 4, 8, halved=True, **d) > 0
    with pytest.raises(ValueError, match="halved"):
        sample_distance(tiny_pipe, tiny_pipe, 4, 6, halved=True, **d)


def test_truncated_snr_weighting_upweights_noisy_steps(tiny_pipe):
    from snapopt.train import StepDistillLoss
    from snapopt.train.step_distill import StepDistillObjective

    snr = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8), device=CPU)
    plain = StepDistillObjective(tiny_pipe, tiny_pipe.unet, _train(), StepDistillLoss(teacher_steps=8, weighting="output"), device=CPU)
    gen = torch.Generator().manual_seed(0)
    x_t, pred, target = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([876, 1])  # very noisy (SNR << 1) and almost clean (SNR >> 1)
    ab = snr.sched.alpha_bar(t).float()
    ratio = snr.distill_error(pred, target, x_t, t) / plain.distill_error(pred, target, x_t, t)
    # epsilon prediction: x0 error = eps error * s/a, so the weight is max(1, 1/SNR) in epsilon space
    torch.testing.assert_close(ratio, torch.clamp((1 - ab) / ab, min=1.0), rtol=1e-4, atol=1e-6)
    assert ratio[0] > 10 and ratio[1] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("lr, shrinks", [(1e-5, True), (1e-4, False)])
def test_step_distillation_brings_the_student_to_the_teacher_trajectory(tiny_pipe, lr, shrinks):
    """CFG-aware 8 -> 4 distillation of the tiny model: at 1e-5 the student's 4-step samples move towards
    the teacher's halved 8-step samples; at 1e-4 (the old specs' rate) Adam's steps overshoot the sharp
    optimum the student starts next to and they move away (issue 11's growing distance, in miniature)."""
    from snapopt.train import StepDistillLoss, Trainer
    from snapopt.train.evaluation import sample_distance
    from snapopt.train.step_distill import StepDistillObjective, loss_summary

    student = tiny_pipe.clone(["unet"])
    o = _train(steps=20, batch=8, optim=dict(lr=lr), data=dict(source="random"))
    obj = StepDistillObjective(tiny_pipe, student.unet, o, StepDistillLoss(teacher_steps=8, cfg_probability=1.0, cfg_range=(2.0, 4.0)),
                               device=CPU)
    kw = dict(prompts=4, cfg=3.0, seed=0, device=CPU, halved=True)
    before = sample_distance(tiny_pipe, student, 4, 8, **kw)
    hist = Trainer(obj, o, None).run().history
    student.unet.eval()
    after = sample_distance(tiny_pipe, student, 4, 8, **kw)
    if shrinks:
        assert after < 0.85 * before, (before, after)
    else:
        assert after > before, (before, after)
    s = loss_summary(hist)
    assert s["distill_cfg_first"] > 0 and s["distill_plain_first"] is None  # every step was CFG-aware


def test_claim_compares_the_student_with_the_many_step_teacher(monkeypatch, tmp_path):
    """FID <=, CLIP >= and attributes within 2 points of the teacher's many-step scores; bad arguments are one line."""
    from snapopt.errors import UsageError
    from snapopt.train import evaluation

    scores = {("t", 50): (15.9, 95.6, 0.905), ("t", 8): (21.9, 91.4, 0.823), ("s", 8): (15.8, 95.7, 0.890)}
    seen = []

    def fake(pipe, n, steps, cfg, seed, grid=None):
        seen.append((pipe, steps, n, cfg, grid and grid.name))
        fid, clip, attr = scores[(pipe, steps)]
        return {"fid": fid, "clip_score": clip, "attribute_accuracy": attr}

    monkeypatch.setattr(evaluation, "zoo_metrics", fake)
    res = evaluation.claim("s", "t", grid_dir=tmp_path)
    assert res["met"] and set(res["rows"]) == {"teacher_50", "teacher_8", "student_8"}
    assert ("s", 8, 64, 7.5, "student_8.png") in seen and ("t", 50, 64, 7.5, "teacher_50.png") in seen
    scores[("s", 8)] = (15.8, 95.7, 0.88)  # 2.5 points below the teacher's attributes
    assert evaluation.claim("s", "t")["checks"] == {"fid": True, "clip_score": True, "attributes": False}
    with pytest.raises(UsageError, match="STUDENT TEACHER OUT.json"):
        evaluation._main(["a", "b"])
    with pytest.raises(UsageError, match="positive integers"):
        evaluation._main(["a", "b", "c.json", "8", "x"])


def test_claim_scores_a_distilled_decoder_apart(monkeypatch, tiny_pipe):
    """A student with its own decoder also gets a row with the teacher's decoder (UNet vs decoder share of the gap);
    the check itself still uses the student as it ships."""
    from snapopt.train import evaluation

    student = tiny_pipe.clone(["vae"])
    assert not evaluation._decoder_differs(student, tiny_pipe)  # a copy with equal weights: nothing to split
    half = tiny_pipe.clone(["vae"])
    half.vae.half()
    assert not evaluation._decoder_differs(half, tiny_pipe)  # nor one saved in fp16
    with torch.no_grad():
        next(student.vae.decoder.parameters()).add_(0.1)
    assert evaluation._decoder_differs(student, tiny_pipe)
    seen = []

    def fake(pipe, n, steps, cfg, seed, grid=None):
        who = "teacher" if pipe is tiny_pipe else "student" if pipe is student else "swapped"
        seen.append((who, pipe.unet is student.unet, pipe.vae is tiny_pipe.vae, steps))
        return {"fid": 15.0, "clip_score": 96.0, "attribute_accuracy": 0.9}

    monkeypatch.setattr(evaluation, "zoo_metrics", fake)
    res = evaluation.claim(student, tiny_pipe)
    assert set(res["rows"]) == {"teacher_50", "teacher_8", "student_8", "student_8_teacher_decoder"} and res["met"]
    # the extra row: the student's UNet under the teacher's decoder; the student's own row keeps its decoder
    assert ("swapped", True, True, 8) in seen and ("student", True, False, 8) in seen


@pytest.mark.parametrize("spec", sorted((Path(__file__).resolve().parents[1] / "snapopt" / "train" / "specs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_spec_loads(spec):
    """The ablation specs that bench/results cite stay valid as the option models change."""
    from snapopt.train.spec import load_spec

    options = load_spec(spec).job_options()
    assert options.train.steps > 0


def test_guidance_kd_is_zero_for_the_teacher_itself_and_trains_the_guidance_direction(tiny_pipe):
    """guidance_kd compares c - u of student and teacher on the same x_t: 0 when the student is the teacher
    (exactly: same weights, same rows), and training on it alone brings the student's direction closer."""
    import copy

    from snapopt.train import RecoverLoss, Trainer
    from snapopt.train.recover import RecoverObjective
    from snapopt.train.dist import DistInfo

    o = _train(steps=8, batch=4, data=dict(fixed_batch=True), optim=dict(lr=3e-3))
    loss = RecoverLoss(task=0.0, output_kd=0.0, feature_kd=0.0, guidance_kd=1.0, guidance_fraction=0.5)
    same = RecoverObjective(tiny_pipe, copy.deepcopy(tiny_pipe.unet), o, loss, device=CPU)
    assert same.guidance_rows(4) == 2 and same.guidance_rows(1) == 1
    _, parts = same.loss(0, DistInfo())
    assert float(parts["guidance_kd"]) == 0.0

    student = _bk_student(tiny_pipe)
    obj = RecoverObjective(tiny_pipe, student.unet, o, loss, device=CPU)
    hist = Trainer(obj, o, None).run().history
    assert set(hist[0]) >= {"task", "guidance_kd"} and "output_kd" not in hist[0]
    assert hist[-1]["guidance_kd"] < 0.7 * hist[0]["guidance_kd"]
    # off by default: the recipes' recovery runs exactly the rows it ran before
    assert RecoverObjective(tiny_pipe, student.unet, o, RecoverLoss(), device=CPU).guidance_rows(512) == 0
