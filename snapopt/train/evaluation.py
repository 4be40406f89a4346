"""Before/after measurements for the training jobs."""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from snapopt.core.phases import phase
from snapopt.quality import VALIDATION_PROMPTS
from snapopt.train.data import embed
from snapopt.train.sampling import sample_latents, split_transitions, student_transitions


@torch.no_grad()
@phase("sample distance")
def sample_distance(teacher, student, student_steps: int, teacher_steps: int, *, prompts: int, cfg: float, seed: int, device,
                    halved: bool = False, student_grid: str = "ddim", texts: list[str] | None = None,
                    cache: dict | None = None) -> float:
    """Relative L2 distance of the student's ``student_steps``-step DDIM latents to the teacher's
    ``teacher_steps``-step latents from the same noise and prompts (lower is better). ``halved``: the
    teacher walks the student's grid with every step split into teacher_steps / student_steps (two for
    N -> N/2: what step distillation trains for)
    instead of diffusers' own ``teacher_steps`` grid. ``student_grid``: the student's path
    (:func:`snapopt.train.sampling.student_transitions`); each pipeline is read under its own prediction type.
    ``texts``: the prompts (default: snapopt.quality.VALIDATION_PROMPTS, repeated to ``prompts``). ``cache``: a dict
    the caller keeps while ``teacher`` is frozen, so the teacher's latents for one setting are sampled once
    (a step-distillation pass measures before and after, on two grids and two prompt sets, against one teacher)."""
    texts = texts or (VALIDATION_PROMPTS * (prompts // len(VALIDATION_PROMPTS) + 1))[:prompts]
    cond = embed(teacher, texts, device, seed)
    uncond = embed(teacher, [""], device, seed + 1)[0]
    shape = (teacher.unet.config.in_channels, teacher.latent_size, teacher.latent_size)
    num_train, offset = len(teacher.scheduler.alphas_cumprod), int(teacher.scheduler.config.get("steps_offset", 1))
    mine = student_transitions(student_steps, student_grid, num_train, offset)
    path = None
    if halved:
        if teacher_steps % student_steps or teacher_steps == student_steps:
            raise ValueError(f"halved needs teacher_steps a multiple (>= 2) of student_steps, got {teacher_steps} and {student_steps}")
        path = split_transitions(mine, teacher_steps // student_steps)
    key = (id(teacher.unet), teacher.prediction_type, teacher_steps, tuple(path) if path else None, tuple(texts), cfg, seed)
    ref = cache.get(key) if cache is not None else None
    if ref is None:
        ref = sample_latents(teacher, cond, uncond, steps=teacher_steps, cfg=cfg, shape=shape, seed=seed, device=device,
                             transitions=path)
        if cache is not None:
            cache[key] = ref
    out = sample_latents(teacher, cond, uncond, steps=student_steps, cfg=cfg, shape=shape, seed=seed, device=device, unet=student.unet,
                         prediction_type=student.prediction_type, transitions=mine)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def heldout_captions(pipe, n: int) -> list[str] | None:
    """The zoo's first ``n`` held-out captions when ``pipe`` descends from zoo:snapshapes (the prompts its FID /
    CLIP / attribute scores use), else None. Half of VALIDATION_PROMPTS are scenes such a model never learnt
    ("a portrait of an astronaut"), so a distance on them says little about the distribution it serves."""
    from snapopt.quality import snapshapes_model

    if not snapshapes_model(pipe):
        return None
    from snapopt.zoo import shapes

    return shapes.heldout_prompts(n).captions()


def diffusers_pipeline(pipe):
    """A diffusers StableDiffusionPipeline sharing ``pipe``'s modules (for the zoo's evaluators), its DDIM
    scheduler told the UNet's prediction type (a v-prediction student sampled as epsilon draws noise)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=pipe.prediction_type)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                 scheduler=scheduler, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


def zoo_metrics(pipe, n_prompts: int, steps: int, cfg: float, seed: int, grid=None) -> dict:
    """FID (eval-CLIP features), CLIP score and attribute accuracy on held-out snapshapes prompts;
    ``grid``: also save the images as one PNG there."""
    from snapopt.zoo.evaluate import evaluate, save_grid

    with phase("zoo evaluation"):
        res = evaluate(diffusers_pipeline(pipe), steps=steps, cfg=cfg, n_prompts=n_prompts, seed=seed, return_images=grid is not None)
    if grid is not None:
        save_grid(res.pop("images"), grid)
        res.pop("captions")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}


def claim(student, teacher, *, student_steps: int = 8, teacher_steps: int = 50, n_prompts: int = 64, cfg: float = 7.5,
          seed: int = 0, grid_dir=None) -> dict:
    """SnapFusion's headline check on the zoo: the student at ``student_steps`` vs the teacher at ``teacher_steps``
    (and at ``student_steps``), same held-out prompts, noise and CFG. ``met``: FID <=, CLIP >= and attribute
    accuracy within 2 points of the teacher's many-step numbers."""
    from pathlib import Path

    runs = {f"teacher_{teacher_steps}": (teacher, teacher_steps), f"teacher_{student_steps}": (teacher, student_steps),
            f"student_{student_steps}": (student, student_steps)}
    if _decoder_differs(student, teacher):  # not part of the check: splits the student's gap into UNet and decoder
        runs[f"student_{student_steps}_teacher_decoder"] = (replace(student, vae=teacher.vae), student_steps)
    rows = {k: zoo_metrics(p, n_prompts, n, cfg, seed, grid=Path(grid_dir) / f"{k}.png" if grid_dir else None)
            for k, (p, n) in runs.items()}
    checks = claim_checks(rows[f"student_{student_steps}"], rows[f"teacher_{teacher_steps}"])
    return {"rows": rows, "checks": checks, "met": all(checks.values())}


def claim_row_names(rows: dict) -> tuple[str, str, str | None] | None:
    """The names of a claim's rows (as :func:`claim` writes them): the student's, the many-step teacher's, and the
    student's under the teacher's decoder (None when absent); None when the rows are not one claim's."""
    students = [k for k in rows if re.fullmatch(r"student_\d+", k)]
    teachers = [k for k in rows if re.fullmatch(r"teacher_\d+", k)]
    if len(students) != 1 or not teachers:
        return None
    swapped = f"{students[0]}_teacher_decoder"
    return students[0], max(teachers, key=lambda k: int(k.split("_")[1])), swapped if swapped in rows else None


def _decoder_differs(student, teacher) -> bool:
    """Whether the student brings its own VAE decoder (pruned or distilled), i.e. a row with the teacher's is informative."""
    a, b = getattr(student, "vae", None), getattr(teacher, "vae", None)
    if a is None or b is None or a is b:
        return False
    sa, sb = a.decoder.state_dict(), b.decoder.state_dict()
    # to fp16 rounding: a run's model may be saved in half precision while its decoder is the teacher's
    return sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or
                                         not torch.allclose(sa[k].cpu().float(), sb[k].cpu().float(), rtol=1e-3, atol=1e-4) for k in sa)


#: how far below the teacher's attribute accuracy the student may be and still meet the claim (2 points)
ATTRIBUTE_SLACK = 0.02


def claim_checks(student: dict, teacher: dict) -> dict[str, bool]:
    """The claim's three tests on two zoo_metrics rows: FID <=, CLIP >= and attribute accuracy within
    :data:`ATTRIBUTE_SLACK` of the teacher's (the one definition; bench/chain_claims.py re-reads runs with it)."""
    return {"fid": student["fid"] <= teacher["fid"], "clip_score": student["clip_score"] >= teacher["clip_score"],
            "attributes": student["attribute_accuracy"] >= teacher["attribute_accuracy"] - ATTRIBUTE_SLACK}


def _main(argv: list[str] | None = None) -> dict:
    """``python -m snapopt.train.evaluation STUDENT TEACHER OUT.json [STUDENT_STEPS TEACHER_STEPS]``: the claim
    table as JSON; the sample grids go in a folder beside OUT.json, named after it."""
    import json
    import sys
    from pathlib import Path

    from snapopt.errors import UsageError
    from snapopt.models.loading import load_model
    from snapopt.serialization import is_snapopt_model, load

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 5) or not all(a.isdigit() and int(a) > 0 for a in args[3:]):
        raise UsageError("usage: python -m snapopt.train.evaluation STUDENT TEACHER OUT.json [STUDENT_STEPS TEACHER_STEPS]"
                         f" (steps: positive integers); got {args}")
    student_ref, teacher_ref, out = args[0], args[1], Path(args[2])
    steps = [int(a) for a in args[3:5]] or [8, 50]
    student = load(student_ref) if is_snapopt_model(Path(student_ref)) else load_model(student_ref)
    teacher = load_model(teacher_ref)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for p in (student, teacher):
        for m in p.present_modules().values():
            m.to(device).eval()
    res = claim(student, teacher, student_steps=steps[0], teacher_steps=steps[1], grid_dir=out.parent / out.stem)
    res.update(student=student_ref, teacher=teacher_ref)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    import sys

    from snapopt.errors import SnapoptError

    try:
        _main()
    except SnapoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
