"""Every SnapFusion chain run in bench/results against issue 11's claim, in one file and one picture.

    python bench/chain_claims.py     # writes bench/results/snapfusion_chain.json and docs/img/chain_claims.png

Reads the runs' ``snapfusion_chain_<card>[_<variant>]_eval.json`` (written by ``bench/snapfusion_chain.py --claim``
on the GPU) and their companion chain JSON (wall time, overrides), re-checks each with the claim's one definition
(:func:`snapopt.train.evaluation.claim_checks`), and sums up how far the runs spread. One run cannot settle a claim
this close: the spread of repeated runs is as large as the effects measured, so the summary keeps every run.
Reads only JSON already in the repository; runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EVAL = re.compile(r"^snapfusion_chain_(?P<card>h100|h200)(?:_(?P<variant>.+))?_eval\.json$")
METRICS = {"fid": "FID", "clip_score": "CLIP", "attribute_accuracy": "attributes"}


def runs(results: Path = RESULTS) -> list[dict]:
    """One row per chain run with a claim evaluation (student at 8 steps vs the teacher at 50, 64 prompts)."""
    from snapopt.train.evaluation import claim_checks, claim_row_names

    rows = []
    for path in sorted(results.glob("snapfusion_chain_*_eval.json")):
        m = EVAL.match(path.name)
        data = json.loads(path.read_text())
        if not m or not isinstance(data.get("rows"), dict):
            continue  # e.g. the CPU guidance sweep: another shape of file
        names = claim_row_names(data["rows"])
        if names is None:
            continue
        student, teacher = data["rows"][names[0]], data["rows"][names[1]]
        swapped = data["rows"][names[2]] if names[2] else None
        chain_path = path.with_name(path.name.replace("_eval.json", ".json"))
        chain = json.loads(chain_path.read_text()) if chain_path.is_file() else {}
        checks = claim_checks(student, teacher)
        signals = step_distill_signals(chain)
        rows.append({"run": m["variant"] or "recipe", "card": m["card"], "file": path.name,
                     "overrides": chain.get("overrides"), "wall_seconds": chain.get("wall_seconds"),
                     "training_config_sha256": chain.get("training_config_sha256"),
                     "student_steps": student["steps"], "teacher_steps": teacher["steps"], "n_prompts": student["n_prompts"],
                     "student": {k: student[k] for k in METRICS}, "teacher": {k: teacher[k] for k in METRICS},
                     "checks": checks, "met": all(checks.values()), **({"step_distill": signals} if signals else {}),
                     # the same UNet with the teacher's decoder (evaluations since the seventh day): the decoder's share
                     **({"student_teacher_decoder": {k: swapped[k] for k in METRICS},
                         "teacher_decoder_checks": claim_checks(swapped, teacher)} if swapped else {})})
    mark_repeats(rows)
    return rows


def mark_repeats(rows: list[dict]) -> None:
    """A deterministic run repeated on the same card gives the same scores to the last digit: one sample, not two.
    Such a row gets ``repeat_of`` (the first run with that training config, card and scores) and the spread skips it."""
    first: dict = {}
    for r in rows:
        key = (r["card"], r.get("training_config_sha256"), json.dumps(r["student"], sort_keys=True),
               json.dumps(r.get("student_teacher_decoder"), sort_keys=True))
        if key in first and r.get("training_config_sha256"):
            r["repeat_of"] = first[key]
        else:
            first.setdefault(key, r["run"])


#: step distillation's own end-of-stage numbers, as the chain JSON's step_distill row holds them
SIGNALS = {"distill_cfg_last": "guided distillation loss, last 10% of steps",
           "distance_zoo_prompts_after": "trajectory distance to the teacher on the zoo's prompts, after"}


def step_distill_signals(chain: dict) -> dict:
    rows = [p for p in chain.get("passes", []) if p.get("pass") == "step_distill"]
    stats = rows[0].get("step_distill", rows[0]) if rows else {}
    return {k: stats[k] for k in SIGNALS if isinstance(stats.get(k), (int, float))}


def predictors(rows: list[dict]) -> dict:
    """Does step distillation's own end-of-stage number predict the chain output? Spearman rank correlation of
    each signal with the output's FID and CLIP, over the runs that trained with the recipe's guidance range (a
    run that changes ``step_distill.loss.cfg_range`` has losses on another scale, so it is left out)."""
    from scipy.stats import spearmanr

    same = [r for r in rows if r.get("step_distill") and not any("cfg_range" in o for o in (r.get("overrides") or []))]
    out = {"runs": len(same), "note": "Spearman rank correlation; runs whose overrides change step_distill.loss.cfg_range left out"}
    for key, what in SIGNALS.items():
        have = [r for r in same if key in r["step_distill"]]
        if len(have) < 3:
            continue
        x = [r["step_distill"][key] for r in have]
        entry = {"what": what, "runs": len(have)}
        for metric in ("fid", "clip_score"):
            rho, p = spearmanr(x, [r["student"][metric] for r in have])
            entry[metric] = {"rho": round(float(rho), 3), "p": round(float(p), 3)}
        out[key] = entry
    return out


def spread(rows: list[dict]) -> dict:
    """Mean, standard deviation, min and max of each metric over the runs, and how many runs pass each test
    (a bit-identical repeat counted once)."""
    rows = [r for r in rows if "repeat_of" not in r]
    out = {"runs": len(rows)}
    for key in METRICS:
        vals = [r["student"][key] for r in rows]
        out[key] = {"mean": round(statistics.fmean(vals), 4), "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else None,
                    "min": min(vals), "max": max(vals)}
    out["runs_passing"] = {k: sum(r["checks"][k] for r in rows) for k in rows[0]["checks"]} if rows else {}
    out["runs_meeting_all"] = sum(r["met"] for r in rows)
    swapped = [r for r in rows if "teacher_decoder_checks" in r]  # the decoder's share: the same UNets, the teacher's decoder
    out["teacher_decoder"] = {"runs": len(swapped), "runs_meeting_all": sum(all(r["teacher_decoder_checks"].values()) for r in swapped)}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """FID against CLIP for every run, attributes as colour, the teacher's bar as lines: the claim's corner is
    the top left (FID at most the teacher's, CLIP at least). Runs scored with the teacher's decoder too get a hollow
    point there, joined to the run's: the distance is what the distilled decoder costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = rows[0]["teacher"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    sc = ax.scatter([r["student"]["fid"] for r in rows], [r["student"]["clip_score"] for r in rows],
                    c=[100 * r["student"]["attribute_accuracy"] for r in rows], cmap="viridis", s=60, edgecolors="k")
    for r in rows:
        ax.annotate(f"{r['run']} ({r['card']})", (r["student"]["fid"], r["student"]["clip_score"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    swapped = [r for r in rows if "student_teacher_decoder" in r]  # the decoder's share: same UNet, the teacher's decoder
    for i, r in enumerate(swapped):
        a, b = r["student"], r["student_teacher_decoder"]
        ax.annotate("", (b["fid"], b["clip_score"]), (a["fid"], a["clip_score"]),
                    arrowprops={"arrowstyle": "<-", "color": "0.5", "lw": 0.8})
        ax.scatter([b["fid"]], [b["clip_score"]], s=60, facecolors="none", edgecolors="0.3",
                   label="same UNet, the teacher's decoder" if i == 0 else None)
    ax.axvline(teacher["fid"], color="tab:red", ls="--", lw=1)
    ax.axhline(teacher["clip_score"], color="tab:red", ls="--", lw=1)
    ax.scatter([teacher["fid"]], [teacher["clip_score"]], marker="*", s=200, color="tab:red",
               label=f"teacher, {rows[0]['teacher_steps']} steps ({100 * teacher['attribute_accuracy']:.1f}% attributes)")
    fig.colorbar(sc, ax=ax, label="attribute accuracy, % (claim: teacher - 2 points)")
    ax.margins(x=0.12)
    ax.set_xlabel(f"FID, {rows[0]['n_prompts']} held-out prompts (lower is better)")
    ax.set_ylabel("CLIP score (higher is better)")
    ax.set_title(f"SnapFusion chain outputs at {rows[0]['student_steps']} steps: {len(rows)} runs vs the claim (top left)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _flags(checks: dict) -> str:
    return "".join("y" if checks[k] else "-" for k in ("fid", "clip_score", "attributes"))


def _scores(m: dict) -> str:
    return f"{m['fid']:.2f} / {m['clip_score']:.2f} / {100 * m['attribute_accuracy']:.1f}%"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--json", type=Path, default=RESULTS / "snapfusion_chain.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "chain_claims.png")
    args = ap.parse_args(argv)
    rows = runs(args.results)
    if not rows:
        raise SystemExit(f"error: no snapfusion_chain_*_eval.json with a claim in {args.results}")
    summary = {"claim": "student at 8 steps: FID <= teacher at 50, CLIP >=, attribute accuracy >= teacher - 2 points "
                        "(64 held-out zoo:snapshapes prompts, CFG 7.5)",
               "command": "python bench/chain_claims.py", "runs": rows, "spread": spread(rows),
               "step_distill_predictors": predictors(rows)}
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    plot(rows, args.plot)
    print("| run | card | FID | CLIP | attributes | met | wall | same UNet, teacher's decoder |\n|---|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        s = r["student"]
        swapped = r.get("student_teacher_decoder")
        other = f"{_scores(swapped)} {_flags(r['teacher_decoder_checks'])}" if swapped else ""
        print(f"| {r['run']} | {r['card']} | {s['fid']:.2f} | {s['clip_score']:.2f} | {100 * s['attribute_accuracy']:.1f}% | "
              f"{_flags(r['checks'])} | {r['wall_seconds'] or '-'} | {other} |")
    sp = summary["spread"]
    print(f"{len(rows)} runs ({sp['runs']} once repeats are counted once); FID {sp['fid']['min']:.2f}-{sp['fid']['max']:.2f} (sd {sp['fid']['sd']}), CLIP "
          f"{sp['clip_score']['min']:.2f}-{sp['clip_score']['max']:.2f}; passing FID/CLIP/attributes: "
          f"{sp['runs_passing']}; all three: {sp['runs_meeting_all']}; with the teacher's decoder, all three: "
          f"{sp['teacher_decoder']['runs_meeting_all']} of {sp['teacher_decoder']['runs']}. Wrote {args.json} and {args.plot}")
    pr = summary["step_distill_predictors"]
    for key in SIGNALS:
        if key in pr:
            e = pr[key]
            print(f"step distillation's {e['what']} vs the output over {e['runs']} runs: Spearman rho "
                  f"{e['fid']['rho']:+.2f} with FID (p {e['fid']['p']:.2f}), {e['clip_score']['rho']:+.2f} with CLIP (p {e['clip_score']['p']:.2f})")
    return summary


if __name__ == "__main__":
    main()
