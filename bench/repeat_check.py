"""Does a recipe give the same model twice on this machine? Runs it ``--runs`` times and compares the saved weights.

    python bench/repeat_check.py recipes/snapfusion-train.yaml --set export.coreml=false --set export.onnx=false \
        --json bench/results/repeat_check_<card>.json

Two GPU chains with deterministic kernels printed identical scores ("Ninth day", docs/training.md), but their weights
were never compared. This does: every tensor of every run's saved model against the first run's (safetensors, bit
for bit, and the largest difference where they are not), with each run's wall time, so the cost of ``deterministic``
is measured beside it (``--set deterministic=false`` for the other half). Runs go into a temporary folder that is
removed afterwards; only the JSON stays.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def model_tensors(model_dir: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of a saved model, keyed by ``<file relative to the model folder>:<tensor name>``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        for name, t in load_file(str(f)).items():
            out[f"{f.relative_to(model_dir)}:{name}"] = t
    return out


def compare(first: dict, other: dict) -> dict:
    """Which tensors differ from the first run's, and by at most how much (absolute)."""
    differing = sorted(k for k in first.keys() & other.keys() if not first[k].equal(other[k]))
    worst = max((float((first[k].double() - other[k].double()).abs().max()) for k in differing), default=0.0)
    return {"identical": not differing and first.keys() == other.keys(), "tensors": len(first),
            "differing_tensors": len(differing), "max_abs_diff": worst, "examples": differing[:5],
            "missing_or_extra": sorted(first.keys() ^ other.keys())[:5]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--model", default=None, help="override the recipe's model reference")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.runs < 2:
        raise SystemExit("error: --runs must be at least 2 (a repeat needs something to compare with)")

    import snapopt.run
    from snapopt.recipe import load_recipe

    resolved = load_recipe(args.recipe, {"model": args.model}, sets=args.sets)
    if not resolved.recipe.output.save_model:
        raise SystemExit("error: output.save_model is false: there are no weights to compare")
    runs, first = [], None
    with tempfile.TemporaryDirectory(prefix="repeat_check.") as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}"
            t0 = time.perf_counter()
            snapopt.run.apply(resolved, out, progress=lambda m, i=i: print(f"[run {i}] {m}", file=sys.stderr, flush=True))
            row = {"run": i, "seconds": round(time.perf_counter() - t0, 1)}
            tensors = model_tensors(out / "model")
            if first is None:
                first, row["tensors"] = tensors, len(tensors)
                manifest = json.loads((out / "manifest.json").read_text())
            else:
                row.update(compare(first, tensors))
            runs.append(row)
    summary = {"recipe": str(args.recipe), "sets": args.sets, "model": resolved.recipe.model,
               "deterministic": resolved.recipe.deterministic, "accelerator": manifest.get("accelerator"),
               "versions": manifest.get("versions"), "runs": runs,
               "identical": all(r.get("identical", True) for r in runs)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("deterministic", "accelerator", "identical")}), flush=True)
    for r in runs[1:]:
        print(f"run {r['run']}: {'identical' if r['identical'] else 'DIFFERENT'} to run 0 "
              f"({r['differing_tensors']} of {r['tensors']} tensors differ, max |diff| {r['max_abs_diff']:.3g}); "
              f"{r['seconds']} s against {runs[0]['seconds']} s")
    return summary


if __name__ == "__main__":
    main()
