"""Lower every component of a model to Core AI ``.aimodel`` assets and run each in ``coreai.runtime`` against torch.

What ``snapopt export MODEL --format coreai`` does, through ``snapopt.run.apply`` with ``export: {coreai: true}``.
Prints a table and saves JSON to bench/results/.

    python bench/lowering_coreai_zoo.py [--model zoo:snapshapes]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes")
    args = ap.parse_args()

    import coreai_torch

    from snapopt.recipe import validate_recipe
    from snapopt.run import apply

    resolved = validate_recipe({"name": "coreai", "model": args.model, "targets": ["iphone-15-pro"], "output": {"save_model": False},
                                "export": {"coreml": False, "onnx": False, "coreai": True,
                                           "components": ["unet", "vae_decoder", "vae_encoder", "text_encoder"]}})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = apply(resolved, Path(tmp) / "run")
        seconds = time.perf_counter() - t0
    rows = [{k: e[k] for k in ("package", "bytes", "inputs", "outputs", "coreai_runtime_relative_error")} for e in result.report["exports"]["coreai"]]
    timings = {k: v for k, v in result.timings.items() if "Core AI" in k}
    print(f"{'asset':20s} {'MB':>7s} {'rel err vs torch':>17s} {'convert+check s':>16s}")
    for r in rows:
        t = next((v for k, v in timings.items() if k.endswith("to Core AI") and r["package"].lower() in k.replace("_", "")), float("nan"))
        print(f"{r['package'] + '.aimodel':20s} {r['bytes'] / 1e6:7.1f} {r['coreai_runtime_relative_error']:17.1e} {t:16.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"lowering_coreai_{args.model.replace(':', '_')}.json"
    out.write_text(json.dumps({"model": args.model, "coreai_torch": coreai_torch.__version__, "machine": platform.machine(),
                               "cpus": __import__("os").cpu_count(), "seconds": seconds, "timings": timings, "assets": rows,
                               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
