"""The three training jobs as functions of (teacher, program, options): what the passes and the CLI call.

Each job measures before and after (recover: distance of UNet outputs to the teacher's; decoder: PSNR vs
the teacher decoder; step distillation: distance of N/2-step student samples to N-step teacher samples),
trains, puts the EMA weights (if any) into the program, and returns stats for the report.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from snapopt.core import PassOptions
from snapopt.core.phases import phase
from snapopt.errors import UsageError
from snapopt.train import dist
from snapopt.train.options import DecoderLoss, RecoverLoss, RobustOptions, StepDistillLoss, StepDistillStage, TrainOptions, student_step_count
from snapopt.train.trainer import Trainer, TrainResult


def _no_student_source(*trains: TrainOptions | None) -> None:
    """The student source samples with the model's own UNet, which a UNet stage is training: refused before any pass runs."""
    if any(t is not None and t.data.source == "student" for t in trains):
        raise ValueError("train.data.source 'student' is for decoder_distill (the model's UNet samples the decoder's latents)")


class RecoverJob(PassOptions):
    component: Literal["unet"] = "unet"
    train: TrainOptions = TrainOptions()
    loss: RecoverLoss = RecoverLoss()
    robust: RobustOptions = RobustOptions()
    eval_timesteps: list[int] = Field(default_factory=lambda: [999, 750, 500, 250, 50], min_length=1)
    zoo_eval_prompts: int = Field(0, ge=0, description="also score FID / CLIP / attributes on this many held-out zoo prompts")
    zoo_eval_steps: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _data(self):
        _no_student_source(self.train)
        return self


class DecoderJob(PassOptions):
    component: Literal["vae_decoder"] = "vae_decoder"
    train: TrainOptions = TrainOptions()
    loss: DecoderLoss = DecoderLoss()
    claim_prompts: int = Field(0, ge=0, description="after training, score the pipeline with the distilled decoder and with the "
                                                    "teacher's on this many held-out zoo prompts (issue 11's claim; 64 is its size), with the "
                                                    "claim's noise (seed 0) whatever train.seed is")
    claim_steps: int = Field(8, ge=1, description="the pipeline's steps in that claim; the teacher runs 50")


class StepDistillJob(PassOptions):
    component: Literal["unet"] = "unet"
    train: TrainOptions = TrainOptions()
    loss: StepDistillLoss = StepDistillLoss()
    teacher: Literal["original", "self"] = Field("original", description="original: the loaded model; self: a frozen copy of the UNet as it enters the pass")
    teacher_distill: StepDistillStage | None = Field(
        None, description="first step-distil (a copy of) the teacher itself 2N -> N with these options and teach from that "
                          "(SnapFusion's 16-step teacher distilled from 32); its loss.teacher_steps must be 2x this job's")
    reparametrise: TrainOptions | None = Field(
        None, description="warm-up that re-expresses the student in loss.student_prediction before distillation "
                          "(needed when that differs from what the UNet outputs as it enters)")
    eval_prompts: int = Field(4, ge=1, description="prompts for the sample-distance evaluation")
    eval_cfg: float = Field(7.5, ge=1)
    zoo_eval_prompts: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _stages(self):
        td = self.teacher_distill
        _no_student_source(self.train, self.reparametrise, td.train if td else None, td.reparametrise if td else None)
        if td is not None and td.loss.teacher_steps != 2 * self.loss.teacher_steps:
            raise ValueError(f"teacher_distill.loss.teacher_steps must be 2 x loss.teacher_steps ({2 * self.loss.teacher_steps}) so the "
                             f"distilled teacher runs the {self.loss.teacher_steps} steps this job distils from; got {td.loss.teacher_steps}")
        if td is not None and self.loss.student_steps not in (None, self.loss.teacher_steps // 2):
            raise ValueError("teacher_distill teaches an N -> N/2 student (the split steps it was trained on); leave loss.student_steps unset")
        if td is not None and td.loss.grid != "halved":
            raise ValueError("teacher_distill.loss.grid must be halved: the distilled teacher is then trained on exactly the "
                             "split steps this job's student is distilled from")
        return self


@contextmanager
def on_device(pipes, device: torch.device):
    """Move the pipelines' modules to ``device`` for training and back to where each was afterwards.

    ``Module.to`` keeps parameter objects but replaces buffers (CLIP's ``position_ids``); a buffer that comes
    back unchanged gets its original tensor back, so the pass manager's check for undeclared writes (tensor
    identity and version) sees a text encoder that was only used, not modified."""
    moved = []
    seen = set()
    with phase("move modules"):
        for pipe in pipes:
            for m in pipe.present_modules().values():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                p = next(m.parameters(), None)
                buffers = [(sub, name, buf) for sub in m.modules() for name, buf in sub._buffers.items() if buf is not None]
                moved.append((m, p.device if p is not None else torch.device("cpu"), buffers))
                m.to(device)
    try:
        yield
    finally:
        with phase("move modules"):
            for m, dev, buffers in moved:
                m.to(dev)
                for sub, name, orig in buffers:
                    now = sub._buffers.get(name)
                    if now is not None and now is not orig and now.dtype == orig.dtype and now.device == orig.device \
                            and now.shape == orig.shape and torch.equal(now, orig):
                        sub._buffers[name] = orig


def _check_teacher(teacher, program, component: str) -> None:
    if teacher is None:
        raise UsageError("no teacher: distillation needs ctx.teacher (the pipeline as loaded before any pass)")
    if program.structure_only or teacher.structure_only:
        raise UsageError("distillation needs weights; load the model without structure_only")
    if component == "unet" and (teacher.unet is None or program.unet is None):
        raise UsageError("distillation of the UNet needs a UNet in both teacher and model")
    if component == "vae_decoder" and (teacher.vae is None or program.vae is None):
        raise UsageError("decoder distillation needs a VAE in both teacher and model")


def _setup(train: TrainOptions):
    info, device = dist.init(train.device)
    torch.manual_seed(train.seed)
    return info, device


def run_recover(teacher, program, o: RecoverJob, out_dir: Path | None, *, resume: bool = False,
                data=None, title: str = "recover") -> tuple[dict[str, Any], TrainResult]:
    """``data``: a :class:`snapopt.train.data.LatentSource` to reuse (callers that train in rounds build it once);
    ``title``: the progress bar's and loss plot's name (block_prune's robust rounds are not the recover pass)."""
    from snapopt.quality import TeacherDistance
    from snapopt.train.recover import RecoverObjective

    _check_teacher(teacher, program, "unet")
    info, device = _setup(o.train)
    with on_device([teacher, program], device):
        with phase("teacher distance"):
            evaluator = TeacherDistance.prepare(teacher, latent=teacher.latent_size, timesteps=tuple(o.eval_timesteps), seed=o.train.seed)
            before = evaluator.score(program)
        zoo_before = _zoo(program, o) if o.zoo_eval_prompts else None  # the pruned student, untrained
        obj = RecoverObjective(teacher, program.unet, o.train, o.loss, o.robust, device=device, data=data)
        try:
            result = Trainer(obj, o.train, out_dir, info=info, device=device, title=title).run(resume=resume)
        finally:
            obj.close()
        program.unet.eval()
        with phase("teacher distance"):
            after = evaluator.score(program)
        stats = {"teacher_distance_before": before, "teacher_distance_after": after,
                 "feature_stages": dict(obj.matcher.pairs) if obj.matcher else {},
                 "feature_stages_dropped": dict(obj.matcher.dropped) if obj.matcher else {},
                 "skip_counts": obj.skip_counts}
        if o.zoo_eval_prompts:
            stats["zoo_teacher"] = _zoo(teacher, o)
            stats["zoo_before"] = zoo_before
            stats["zoo_after"] = _zoo(program, o)
    stats.update(_train_stats(result))
    return stats, result


def _zoo(pipe, o: RecoverJob) -> dict[str, Any]:
    from snapopt.train.evaluation import zoo_metrics

    pipe.unet.eval()
    return zoo_metrics(pipe, o.zoo_eval_prompts, o.zoo_eval_steps, 7.5, o.train.seed)


def run_decoder(teacher, program, o: DecoderJob, out_dir: Path | None, *, resume: bool = False) -> tuple[dict[str, Any], TrainResult]:
    from snapopt.train.decoder import DecoderObjective

    _check_teacher(teacher, program, "vae_decoder")
    if o.claim_prompts:
        from snapopt.quality import snapshapes_model

        if not snapshapes_model(teacher):  # before training, not after it
            raise UsageError("claim_prompts scores on the zoo's held-out prompts: the model must be zoo:snapshapes or descend from it")
    info, device = _setup(o.train)
    with on_device([teacher, program], device):
        student = program.component("vae_decoder")
        program.unet.eval()  # samples the pool of data.source 'student'
        obj = DecoderObjective(teacher, student, o.train, o.loss, device=device, sampler=program)
        with phase("decoder psnr"):
            before = obj.psnr_vs_teacher()
        result = Trainer(obj, o.train, out_dir, info=info, device=device, title="decoder_distill").run(resume=resume)
        student.eval()
        with phase("decoder psnr"):
            after = obj.psnr_vs_teacher()
        stats: dict[str, Any] = {"psnr_before_db": round(before, 3), "psnr_after_db": round(after, 3)}
        if o.claim_prompts:  # PSNR on latents alone did not rank decoders by what they cost the pipeline's samples
            from snapopt.train.evaluation import claim

            # the claim's own noise (seed 0, as a chain's claim): a job trained with another seed meets the same bar
            stats["claim"] = claim(program, teacher, student_steps=o.claim_steps, n_prompts=o.claim_prompts, seed=0,
                                   grid_dir=out_dir / "claim" if out_dir else None)
    stats.update(_train_stats(result))
    return stats, result


def run_step_distill(teacher, program, o: StepDistillJob, out_dir: Path | None, *, resume: bool = False) -> tuple[dict[str, Any], TrainResult]:
    """Step-distil ``program``'s UNet in place (N -> N/2) from the teacher: the original, or with ``teacher:
    self`` a frozen copy of the UNet as it enters, or that teacher first step-distilled 2N -> N itself
    (``teacher_distill``: a copy is trained, under ``<out>/teacher/``). A student that changes its prediction
    type is re-expressed first (``reparametrise``, under ``<out>/reparametrise/``) and ``program`` leaves
    with the new type in its schedulers."""
    _check_teacher(teacher, program, "unet")
    info, device = _setup(o.train)
    ref = teacher
    if o.teacher == "self":  # what the UNet outputs as it enters, not what the loaded model did
        ref = replace(teacher, unet=copy.deepcopy(program.unet).eval(), prediction_type=program.prediction_type)
    with on_device([ref, program], device):
        stats: dict[str, Any] = {}
        if o.teacher_distill is not None:
            td = o.teacher_distill
            student = replace(ref, unet=copy.deepcopy(ref.unet), extra=dict(ref.extra))
            t_stats, _ = _distill_stage(teacher, ref, student, td.train, td.loss, td.reparametrise, o, _sub(out_dir, "teacher"),
                                        resume, info, device)
            student.unet.eval().requires_grad_(False)
            ref = student
            stats["teacher_distill"] = t_stats
        main, result = _distill_stage(teacher, ref, program, o.train, o.loss, o.reparametrise, o, out_dir, resume, info, device,
                                      reparam_dir=_sub(out_dir, "reparametrise"))
    stats = {**main, **stats}
    return stats, result


def _sub(out_dir: Path | None, name: str) -> Path | None:
    return None if out_dir is None else Path(out_dir) / name


def _distill_stage(data_pipe, ref, program, train: TrainOptions, loss: StepDistillLoss, reparam: TrainOptions | None, o: StepDistillJob,
                   out_dir: Path | None, resume: bool, info, device, *, reparam_dir: Path | None = None) -> tuple[dict[str, Any], TrainResult]:
    """One N -> N/2 stage: ``program``'s UNet learns from ``ref`` (modules already on ``device``); the
    training data come from ``data_pipe`` (the loaded model), so every stage shares one latent pool."""
    from snapopt.train.evaluation import heldout_captions, sample_distance, zoo_metrics
    from snapopt.train.step_distill import ReparamObjective, StepDistillObjective, loss_summary, set_prediction_type

    n, half = loss.teacher_steps, student_step_count(loss)
    want = loss.student_prediction or program.prediction_type
    # one cache of the teacher's latents per stage: ``ref`` is frozen, so before and after share them
    kw = dict(prompts=o.eval_prompts, cfg=o.eval_cfg, seed=train.seed, device=device, student_grid=loss.grid, cache={})
    stats: dict[str, Any] = {"teacher_steps": n, "student_steps": half, "grid": loss.grid, "teacher_prediction": ref.prediction_type}
    if want != program.prediction_type:
        if reparam is None:
            raise UsageError(f"step_distill: loss.student_prediction is {want} but the UNet outputs {program.prediction_type}; give "
                             "`reparametrise` (train options of the warm-up that re-expresses it, e.g. {steps: 600, optim: {lr: 1.0e-4}})")
        entering = replace(program, unet=copy.deepcopy(program.unet).eval(), extra=dict(program.extra))
        r_obj = ReparamObjective(data_pipe, program.unet, reparam, source_prediction=program.prediction_type, target_prediction=want,
                                 device=device, reference_unet=entering.unet)
        r_res = Trainer(r_obj, reparam, reparam_dir if reparam_dir is not None else _sub(out_dir, "reparametrise"), info=info,
                        device=device, title="reparametrise").run(resume=resume)
        program.unet.eval()
        set_prediction_type(program, want)
        # its own samples before and after, same noise: how much the switch changed what it draws
        stats["reparametrise"] = {"from": entering.prediction_type, "to": want, "steps": reparam.steps,
                                  "seconds": round(r_res.seconds, 2), "loss_first": r_res.history[0]["loss"] if r_res.history else None,
                                  "loss_last": r_res.final.get("loss"),
                                  "sample_change": sample_distance(entering, program, half, half, **kw),
                                  "sample_change_50": sample_distance(entering, program, 50, 50, **{**kw, "student_grid": "ddim"})}
    stats["student_prediction"] = program.prediction_type
    before = {"student_half_steps": sample_distance(ref, program, half, n, **kw), "teacher_half_steps": sample_distance(ref, ref, half, n, **kw),
              "halved": sample_distance(ref, program, half, n, halved=True, **kw)}
    zoo_texts = heldout_captions(data_pipe, o.eval_prompts)  # also on the prompts the zoo scores use
    if zoo_texts:
        before["zoo"] = sample_distance(ref, program, half, n, texts=zoo_texts, **kw)
        before["zoo_halved"] = sample_distance(ref, program, half, n, halved=True, texts=zoo_texts, **kw)
    obj = StepDistillObjective(ref, program.unet, train, loss, device=device, student_prediction=program.prediction_type,
                               data=_shared_data(data_pipe, train, device))
    result = Trainer(obj, train, out_dir, info=info, device=device, title=f"step_distill {n}->{half}").run(resume=resume)
    program.unet.eval()
    stats.update({"distance_before": before["student_half_steps"], "distance_after": sample_distance(ref, program, half, n, **kw),
                  "teacher_at_half_steps": before["teacher_half_steps"],
                  # to the teacher on the student's grid with each step split into its teacher steps: the path it was trained on
                  "distance_halved_before": before["halved"], "distance_halved_after": sample_distance(ref, program, half, n, halved=True, **kw)})
    if zoo_texts:
        stats.update({"distance_zoo_prompts_before": before["zoo"],
                      "distance_zoo_prompts_after": sample_distance(ref, program, half, n, texts=zoo_texts, **kw),
                      "distance_zoo_prompts_halved_before": before["zoo_halved"],
                      "distance_zoo_prompts_halved_after": sample_distance(ref, program, half, n, halved=True, texts=zoo_texts, **kw)})
    if o.zoo_eval_prompts:
        stats["zoo_teacher_n"] = zoo_metrics(ref, o.zoo_eval_prompts, n, o.eval_cfg, train.seed)
        stats["zoo_teacher_half"] = zoo_metrics(ref, o.zoo_eval_prompts, half, o.eval_cfg, train.seed)
        stats["zoo_student_half"] = zoo_metrics(program, o.zoo_eval_prompts, half, o.eval_cfg, train.seed)
    stats.update(_train_stats(result))
    stats.update(loss_summary(result.history))  # CFG-aware and plain errors apart: their scales differ ~30x
    return stats, result


def _shared_data(pipe, train: TrainOptions, device):
    from snapopt.train.data import LatentSource

    return LatentSource(pipe, train.data, seed=train.seed, device=device, num_train=len(pipe.scheduler.alphas_cumprod))


def _train_stats(result: TrainResult) -> dict[str, Any]:
    first, last = (result.history[0] if result.history else {}), result.final
    # a resumed pass trained ``resumed_from`` steps in an earlier process: the report counts them all
    return {"steps": result.steps + (result.resumed_from or 0), "steps_this_run": result.steps,
            "seconds": round(result.seconds, 2),
            "images_per_second": round(result.images_per_second, 2) if result.images_per_second else None,
            "loss_first": first.get("loss"), "loss_last": last.get("loss"), "resumed_from": result.resumed_from,
            **({"notes": result.extra["notes"]} if result.extra.get("notes") else {}),
            **({"cuda_graphs": result.extra["cuda_graphs"]} if "cuda_graphs" in result.extra else {})}
