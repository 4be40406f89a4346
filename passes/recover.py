"""Training passes: distillation recovery of the UNet (BK-SDM; SnapFusion robust training; SnapGen
timestep-aware scaling), decoder data distillation, and CFG-aware step distillation (SnapFusion).

They learn from ``ctx.teacher``, the pipeline as loaded before any pass, and can follow any pass. Each
writes its loss CSV, loss plot and checkpoints under ``<run>/<pass>-<index>/`` and adds a report section
with the before/after metrics. A pass whose folder already holds checkpoints continues from the latest
(``snapopt apply --resume`` of a killed run; a fresh run's folder is empty). The training itself lives in
:mod:`snapopt.train`.
"""

from __future__ import annotations

from pathlib import Path

from snapopt.core import Pass, PassContext, PassResult
from snapopt.errors import UsageError
from snapopt.train.jobs import DecoderJob, RecoverJob, StepDistillJob, run_decoder, run_recover, run_step_distill


class _TrainingPass(Pass):
    """Shared shape of a training pass: train ``program`` against the teacher, report what it measured.
    Subclasses name the job (``train``) and the rows of their report section (``report_rows``)."""

    structural = False

    def train(self, teacher, program, out: Path | None, resume: bool = False) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def report_rows(self, stats: dict) -> tuple[str, list[tuple[str, object]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, program, ctx: PassContext) -> PassResult:
        teacher = self._teacher(ctx)
        out = self._out_dir(ctx)
        # left by a killed run of this pass (a stage of it may keep its own under a subfolder)
        resume = out is not None and out.is_dir() and any(p.is_dir() for p in out.rglob("checkpoints"))
        stats = self.train(teacher, program, out, resume)
        title, rows = self.report_rows(stats)
        self._report(ctx, out, title, rows, stats)
        return PassResult(program, modified=True, stats=stats)

    def _out_dir(self, ctx: PassContext) -> Path | None:
        if ctx.work_dir is None:
            return None
        return Path(ctx.work_dir) / f"{self.name}-{len(ctx.history)}"

    def _teacher(self, ctx: PassContext):
        if ctx.teacher is None:
            raise UsageError(f"{self.name}: no teacher; set PassContext.teacher to the pipeline as loaded (snapopt apply does)")
        return ctx.teacher

    def _report(self, ctx: PassContext, out: Path | None, title: str, rows: list[tuple[str, object]], stats: dict) -> None:
        lines = ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
        if out is not None and (out / "losses.png").is_file():
            rel = out.relative_to(ctx.work_dir) if ctx.work_dir else out
            lines = [f"![{self.name} losses]({rel.as_posix()}/losses.png)", ""] + lines
        ctx.report.setdefault("sections", []).append({"title": title, "lines": lines})
        ctx.report.setdefault("training", []).append({"pass": self.name, "stats": stats})


def _zoo_rows(stats: dict, labels: dict[str, str]) -> list[tuple[str, object]]:
    """FID / CLIP score / attribute accuracy rows for the zoo evaluations a job ran (``labels``: stats key → row label)."""
    rows = []
    for key, label in labels.items():
        z = stats.get(key)
        if z:
            rows.append((f"{label}: FID / CLIP / attributes ({z['steps']} steps)",
                         f"{z['fid']:.1f} / {z['clip_score']:.1f} / {100 * z['attribute_accuracy']:.1f}%"))
    return rows


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Recover(_TrainingPass):
    """Distillation recovery of the UNet from the teacher: task + output KD + stage-feature KD, optional robust block skipping."""

    name = "recover"
    Options = RecoverJob

    def train(self, teacher, program, out, resume=False):
        return run_recover(teacher, program, self.options, out, resume=resume)[0]

    def report_rows(self, stats):
        return "Recovery training (distillation from the teacher)", [
            ("teacher distance before", stats["teacher_distance_before"]), ("teacher distance after", stats["teacher_distance_after"]),
            ("steps", stats["steps"]), ("images/s", stats["images_per_second"]), ("loss first → last", f"{_fmt(stats['loss_first'])} → {_fmt(stats['loss_last'])}"),
                ("feature stages", ", ".join(stats["feature_stages"]) or "none"),
            *_zoo_rows(stats, {"zoo_teacher": "teacher", "zoo_before": "student before recovery", "zoo_after": "student after recovery"})]


class DecoderDistill(_TrainingPass):
    """Decoder data distillation: the (pruned) VAE decoder learns the teacher decoder's images from latents; PSNR before/after."""

    name = "decoder_distill"
    Options = DecoderJob

    def train(self, teacher, program, out, resume=False):
        return run_decoder(teacher, program, self.options, out, resume=resume)[0]

    def report_rows(self, stats):
        rows = [("PSNR vs teacher decoder before (dB)", stats["psnr_before_db"]), ("PSNR after (dB)", stats["psnr_after_db"]),
                ("steps", stats["steps"]), ("images/s", stats["images_per_second"])]
        for name, r in stats.get("claim", {}).get("rows", {}).items():  # claim_prompts: the pipeline with either decoder
            who, steps, *swapped = name.split("_", 2)
            who = "this pipeline" if who == "student" else "teacher"
            rows.append((f"{who}{' with the teacher decoder' if swapped else ''}, {steps} steps: FID / CLIP / attributes",
                         f"{r['fid']:.2f} / {r['clip_score']:.2f} / {100 * r['attribute_accuracy']:.1f}%"))
        return "Decoder data distillation", rows


class StepDistill(_TrainingPass):
    """Step distillation N → N/2 (or N → student_steps): one student DDIM step matches two (or N/student_steps) teacher
    steps, optionally CFG-aware (SnapFusion)."""

    name = "step_distill"
    Options = StepDistillJob

    def train(self, teacher, program, out, resume=False):
        from snapopt.train.step_distill import loss_summary

        stats, result = run_step_distill(teacher, program, self.options, out, resume=resume)
        return {**stats, **loss_summary(result.history)}

    def report_rows(self, stats):
        n, h = stats["teacher_steps"], stats["student_steps"]
        losses = [(f"distillation error, {kind} steps, first → last 10%",
                   f"{_fmt(stats[f'distill_{kind}_first'])} → {_fmt(stats[f'distill_{kind}_last'])}")
                  for kind in ("cfg", "plain") if stats.get(f"distill_{kind}_first") is not None]
        zoo = _zoo_distance_rows(stats, n, h)
        # a zoo model's captions are what it was trained and is scored on: that distance leads; the general prompts
        # (snapopt.quality.VALIDATION_PROMPTS) are outside its distribution, where a distilled student may drift
        where = " on general prompts (outside the model's training captions)" if zoo else ""
        general = [(f"distance of {h}-step student samples to {n}-step teacher{where}, before → after",
                    f"{_fmt(stats['distance_before'])} → {_fmt(stats['distance_after'])}"),
                   (f"teacher itself at {h} steps{where}", stats["teacher_at_half_steps"]),
                   (f"distance to the teacher on the {h}-step grid, each step split into {n // h}{',' + where if where else ''}, before → after",
                    f"{_fmt(stats['distance_halved_before'])} → {_fmt(stats['distance_halved_after'])}")]
        return f"Step distillation {n} → {h}", [*_stage_rows(stats), *zoo, *general,
                ("steps", stats["steps"]), ("images/s", stats["images_per_second"]), *losses,
            *_zoo_rows(stats, {"zoo_teacher_n": f"teacher, {n} steps", "zoo_teacher_half": f"teacher, {h} steps",
                               "zoo_student_half": f"student, {h} steps"})]


def _zoo_distance_rows(stats: dict, n: int, h: int) -> list[tuple[str, object]]:
    """The same distances on the zoo's held-out captions (zoo teachers only): the prompts its scores use."""
    if stats.get("distance_zoo_prompts_before") is None:
        return []
    return [(f"distance of {h}-step student samples to {n}-step teacher on the zoo's held-out prompts, before → after",
             f"{_fmt(stats['distance_zoo_prompts_before'])} → {_fmt(stats['distance_zoo_prompts_after'])}"),
            (f"… on the zoo's held-out prompts, {h}-step grid with each step split into {n // h}, before → after",
             f"{_fmt(stats['distance_zoo_prompts_halved_before'])} → {_fmt(stats['distance_zoo_prompts_halved_after'])}")]


def _stage_rows(stats: dict) -> list[tuple[str, object]]:
    """What the step_distill pass did before distilling: the teacher's own step distillation, the student's
    switch of prediction type (its samples before vs after, same noise: the switch should not change them)."""
    rows: list[tuple[str, object]] = []
    td = stats.get("teacher_distill")
    if td:
        rows += [("teacher", f"step-distilled {td['teacher_steps']} → {td['student_steps']} first ({td['grid']} grid, "
                             f"{td['student_prediction']}), {td['steps']} steps"),
                 (f"… its distance to the original at {td['teacher_steps']} steps, halved grid, before → after",
                  f"{_fmt(td['distance_halved_before'])} → {_fmt(td['distance_halved_after'])}")]
        rows += _reparam_rows(td, "teacher")
        rows += _zoo_rows(td, {"zoo_student_half": f"distilled teacher, {td['student_steps']} steps"})
    rows += _reparam_rows(stats, "student")
    rows.append(("student prediction type", stats.get("student_prediction", "epsilon")))
    return rows


def _reparam_rows(stats: dict, who: str) -> list[tuple[str, object]]:
    r = stats.get("reparametrise")
    if not r:
        return []
    return [(f"{who} re-expressed {r['from']} → {r['to']} ({r['steps']} steps): its own samples moved by "
             f"({stats['student_steps']} / 50 steps)", f"{_fmt(r['sample_change'])} / {_fmt(r['sample_change_50'])}")]
