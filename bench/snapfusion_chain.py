"""Wall time of recipes/snapfusion-train.yaml end to end, per stage, on whatever GPU runs it.

Runs ``snapopt apply RECIPE --out RUN --resume`` as a new user would, then reads the run's report.json: each pass's
seconds, the run's stage timings (load, passes, quality, save, exports) and each training pass's own
training seconds and images/s. Writes one JSON (default bench/results/snapfusion_chain_<card>.json).

    python bench/snapfusion_chain.py --out runs/chain
    python bench/snapfusion_chain.py --report-only runs/chain   # re-read a finished run
    python bench/snapfusion_chain.py --out runs/chain --claim   # and score issue 11's claim on its model
    python bench/snapfusion_chain.py --out runs/chain-self --name snapfusion_chain_self \
        --set step_distill.teacher=self                          # an ablation: `snapopt apply --set`, recorded in the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summarise(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    rows = []
    for rec in report.get("passes", []):
        row = {"pass": rec["pass"], "seconds": rec.get("seconds")}
        if rec.get("phases"):
            row["phases"] = rec["phases"]  # where the pass's seconds went (snapopt.core.phases)
        stats = (rec.get("stats") or {}) if isinstance(rec.get("stats"), dict) else {}
        for k in ("seconds", "images_per_second", "steps"):
            if k in stats:
                row[f"train_{k}"] = stats[k]
        if rec["pass"] == "step_distill":
            row["step_distill"] = step_distill_summary(stats)
        rows.append(row)
    # overrides: the run's `snapopt apply --set` list (this script's --set), as its report recorded them
    return {"run": str(run), "total_seconds": report.get("seconds"), "overrides": report.get("overrides", []),
            "training_config_sha256": training_config_sha256(report), "passes": rows,
            "stages": report.get("timings") or report.get("stages"), "quality": report.get("quality")}


def training_config_sha256(report: dict) -> str | None:
    """A hash of what decides the output's weights (model, seed, passes and their options, overrides applied;
    not exports or targets' file names): runs with equal hashes are repeats, and their spread is GPU noise."""
    import hashlib

    recipe = report.get("recipe")
    if not isinstance(recipe, dict):
        return None
    key = {k: recipe.get(k) for k in ("model", "seed", "batch", "resolution", "passes")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def step_distill_summary(stats: dict) -> dict:
    """The step_distill pass's stages: the teacher's own 32 -> 16 distillation, each re-expression warm-up
    (epsilon -> v: how far it moved the model's own samples) and the student's distances and zoo scores."""
    keep = ("teacher_steps", "student_steps", "grid", "teacher_prediction", "student_prediction", "distance_before", "distance_after",
            "teacher_at_half_steps", "distance_halved_before", "distance_halved_after", "reparametrise", "seconds",
            "distance_zoo_prompts_before", "distance_zoo_prompts_after", "distance_zoo_prompts_halved_before",
            "distance_zoo_prompts_halved_after",
            "zoo_teacher_n", "zoo_teacher_half", "zoo_student_half", "distill_cfg_first", "distill_cfg_last")
    out = {k: stats[k] for k in keep if k in stats}
    if stats.get("teacher_distill"):
        out["teacher_distill"] = {k: stats["teacher_distill"][k] for k in keep if k in stats["teacher_distill"]}
    return out


def claim(run: Path, out: Path, steps: tuple[int, int] = (8, 50)) -> dict:
    """Issue 11's check on the run's model: ``python -m snapopt.train.evaluation MODEL zoo:snapshapes OUT 8 50``
    (64 held-out prompts, CFG 7.5, DDIM, the teacher's FID/CLIP at 50 steps as the bar)."""
    cmd = [sys.executable, "-m", "snapopt.train.evaluation", str(run / "model"), "zoo:snapshapes", str(out), *map(str, steps)]
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    if rc:
        sys.exit(f"evaluation exited {rc}: {' '.join(cmd)}")
    res = json.loads(out.read_text())
    return {"command": " ".join(["python", "-m", "snapopt.train.evaluation", "RUN/model", "zoo:snapshapes", out.name, *map(str, steps)]),
            "met": res["met"], "checks": res["checks"], "rows": res["rows"]}


def card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "unknown"


def attempts_file(out: Path) -> Path:
    """OUT.attempts.json, beside the run folder (which stays hidden in its work folder until the run completes)."""
    return out.with_name(out.name + ".attempts.json")


def record_attempt(out: Path, wall: float, rc: int) -> list[dict]:
    """Append this `snapopt apply` attempt to OUT.attempts.json and return all of them: a chain continued with
    --resume took the sum of its attempts, and its report times only the last one."""
    path = attempts_file(out)
    attempts = json.loads(path.read_text()) if path.exists() else []
    attempts.append({"wall_seconds": wall, "exit": rc})
    path.write_text(json.dumps(attempts))
    return attempts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "snapfusion-train.yaml"))
    ap.add_argument("--out", type=Path, default=Path("runs/chain"))
    ap.add_argument("--report-only", type=Path, default=None, help="summarise an existing run folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--claim", action="store_true", help="also score the run's model at 8 steps against the teacher at 50 "
                                                          "(issue 11's claim; JSON and sample grids beside the result)")
    ap.add_argument("--name", default="snapfusion_chain", help="result name: bench/results/<name>_<card>.json")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to snapopt apply --set (repeatable), e.g. recover.loss.timestep_scaling=false")
    args = ap.parse_args()
    wall = None
    run = args.report_only or args.out
    if args.report_only is None:
        from snapopt.checks.output import work_folder

        if not args.out.exists() and not work_folder(args.out).exists():
            attempts_file(args.out).unlink(missing_ok=True)  # a fresh run: earlier attempts were another run's
        t0 = time.perf_counter()
        # --resume: a run that dies (a preempted machine, a failed export) keeps its finished passes; the same
        # command continues it, and the report then says how many passes were reused (its timings are partial)
        cmd = [sys.executable, "-c", "from snapopt.cli import main; main()", "apply", args.recipe, "--out", str(args.out), "--resume"]
        cmd += [a for s in args.sets for a in ("--set", s)]
        rc = subprocess.call(cmd)
        wall = round(time.perf_counter() - t0, 1)
        attempts = record_attempt(args.out, wall, rc)
        if rc:
            sys.exit(f"snapopt apply exited {rc} after {wall} s; the same command continues it (--resume)")
    res = {"device": card(), "recipe": os.path.relpath(args.recipe, ROOT), "wall_seconds": wall, **summarise(run)}
    if args.report_only is None and len(attempts) > 1:  # a resumed chain: its wall is every attempt's, not the last one's
        res.update(wall_seconds=round(sum(a["wall_seconds"] for a in attempts), 1), attempts=attempts)
    name = res["device"].replace("NVIDIA ", "").split()[0].lower()
    out = args.json or ROOT / "bench" / "results" / f"{args.name}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.claim:
        res["claim"] = claim(run, out.with_name(out.stem + "_eval.json"))
    out.write_text(json.dumps(res, indent=1, default=str))
    for r in res["passes"]:
        print(f"{r['pass']:26s} {r['seconds']:>8} s   train {r.get('train_seconds', '-')} s  {r.get('train_images_per_second', '-')} img/s")
        if r.get("phases"):
            print("    " + ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items()))
    sets = f"; overrides: {' '.join(res['overrides'])}" if res["overrides"] else ""
    print(f"total {res['total_seconds']} s (wall {wall} s){sets}; wrote {out}")


if __name__ == "__main__":
    main()
