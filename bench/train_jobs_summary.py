"""One JSON (and a printed table) from training jobs' run folders: what bench/device/train_jobs.sh brings back.

Each folder holds a job's result.json (`python -m snapopt.train SPEC --out FOLDER`). Per job: the spec file, the
loss options, pool, learning rate, steps, seed, training seconds and images/s, the teacher distance before and after,
and the zoo scores (the teacher, the student before and after; for step distillation the teacher at N and N/2 steps
and the student at N/2, with the trajectory distances on the zoo's prompts) with the steps they were taken at. Jobs evaluated
with different noise seeds carry their own teacher row: compare each student with the teacher beside it.

    python bench/train_jobs_summary.py RUN_FOLDER... --out bench/results/recover_guidance_kd_h100.json \
        --question "does guidance-direction KD lift the recovered UNet?" --device "NVIDIA H100 80GB HBM3"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ZOO_KEYS = ("steps", "n_prompts", "seed", "fid", "clip_score", "attribute_accuracy", "shape_accuracy",
            "colour_accuracy", "position_accuracy")


def summarise(folder: Path) -> dict:
    from snapopt.train.evaluation import claim_row_names

    result = json.loads((folder / "result.json").read_text())
    spec, stats = result["spec"], result.get("stats", {})
    opts = spec.get("options", {})
    train = opts.get("train", {})
    row = {
        "job": spec.get("job"),
        "loss": opts.get("loss", {}),
        "pool": train.get("data", {}).get("pool"),
        "lr": train.get("optim", {}).get("lr"),
        "steps": train.get("steps"),
        "seed": train.get("seed", 0),
        "train_seconds": stats.get("seconds"),
        "images_per_second": stats.get("images_per_second"),
        "teacher_distance_before": stats.get("teacher_distance_before"),
        "teacher_distance_after": stats.get("teacher_distance_after"),
    }
    if spec.get("job") == "decoder_distill":
        row.update({k: stats.get(k) for k in ("psnr_before_db", "psnr_after_db")})
    if spec.get("job") == "step_distill":
        row.update({k: stats.get(k) for k in ("teacher_steps", "student_steps", "distance_zoo_prompts_before",
                                               "distance_zoo_prompts_after", "distance_zoo_prompts_halved_before",
                                               "distance_zoo_prompts_halved_after")})
    # step distillation scores the teacher at N steps, itself at N/2 and the student at N/2 (zoo_*_n / _half)
    for key in ("zoo_teacher", "zoo_before", "zoo_after", "zoo_teacher_n", "zoo_teacher_half", "zoo_student_half"):
        if key in stats:
            row[key] = {k: stats[key][k] for k in ZOO_KEYS if k in stats[key]}
    if "claim" in stats:  # decoder jobs with claim_prompts: the pipeline with the distilled and with the teacher's decoder
        c = stats["claim"]
        row["claim"] = {"rows": {name: {k: r[k] for k in ZOO_KEYS if k in r} for name, r in c["rows"].items()},
                        "checks": c["checks"], "met": c["met"]}
        rows = row["claim"]["rows"]
        student, teacher, _ = claim_row_names(rows)
        row["zoo_teacher"], row["zoo_after"] = rows[teacher], rows[student]
    return row


def main() -> None:
    from snapopt.train.evaluation import claim_row_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="job run folders (each with result.json)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--question", default="")
    ap.add_argument("--device", default="")
    ap.add_argument("--command", default="", help="how the jobs were run (e.g. the train_jobs.sh line)")
    args = ap.parse_args()
    missing = [str(f) for f in args.folders if not (f / "result.json").is_file()]
    if missing:
        ap.exit(2, f"train_jobs_summary: no result.json in {', '.join(missing)}\n")
    runs = {f.name: summarise(f) for f in args.folders}
    out = {"device": args.device, "command": args.command, "question": args.question, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'job':44s} {'seed':>4s} {'teacher FID/CLIP':>18s} {'after FID/CLIP/attr':>24s} {'img/s':>7s}")
    for name, r in runs.items():
        t, a = r.get("zoo_teacher", r.get("zoo_teacher_n", {})), r.get("zoo_after", r.get("zoo_student_half", {}))
        print(f"{name:44s} {r['seed']:>4} {t.get('fid', float('nan')):8.2f} / {t.get('clip_score', float('nan')):6.2f} "
              f"{a.get('fid', float('nan')):8.2f} / {a.get('clip_score', float('nan')):6.2f} / {a.get('attribute_accuracy', float('nan')):.3f} "
              f"{r['images_per_second'] or float('nan'):7.0f}")
    for name, r in runs.items():  # decoder jobs with claim_prompts: the same UNet with the teacher's decoder, and the checks
        if "claim" in r:
            c = r["claim"]
            name_swapped = claim_row_names(c["rows"])[2]
            swapped = c["rows"][name_swapped] if name_swapped else None
            flags = " ".join(f"{k} {'yes' if v else 'no'}" for k, v in c["checks"].items())
            extra = (f"teacher's decoder {swapped['fid']:.2f} / {swapped['clip_score']:.2f} / {swapped['attribute_accuracy']:.3f}; "
                     if swapped else "")
            print(f"  {name}: PSNR {r.get('psnr_after_db')} dB; {extra}claim: {flags}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
