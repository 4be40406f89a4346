"""Lower every component of a model to Core AI ``.aimodel`` assets and run each in ``coreai.runtime`` against torch:
fp32 (no compression), fp16, and compressed through coreai-opt (default: 4-bit palettization and W8A8).

What ``snapopt export MODEL --format coreai`` does, through ``snapopt.run.apply`` with ``export: {coreai: true}``
(and ``compression:`` for the fp16 and compressed exports). Prints a table and saves JSON to bench/results/.

    python bench/lowering_coreai_zoo.py [--model zoo:snapshapes] [--compression '{"scheme": "palettize", "bits": 4}' ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMPONENTS = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]
KEYS = ("package", "bytes", "inputs", "outputs", "compression", "coreai_runtime_relative_error", "coreai_runtime_psnr_db",
        "coreai_runtime_vs_simulation_relative_error", "simulation_relative_error")


def export(model: str, compression, target: str) -> dict:
    from snapopt.recipe import validate_recipe
    from snapopt.run import apply

    ex = {"coreml": False, "onnx": False, "coreai": True, "components": COMPONENTS}
    if compression is not None:
        ex["compression"] = compression
    resolved = validate_recipe({"name": "coreai", "model": model, "targets": [target], "output": {"save_model": False}, "export": ex})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = apply(resolved, Path(tmp) / "run")
        seconds = time.perf_counter() - t0
    rows = [{k: e[k] for k in KEYS if k in e} for e in result.report["exports"]["coreai"]]
    timings = {k: v for k, v in result.timings.items() if "Core AI" in k or "analyse" in k}
    return {"compression": compression, "plan": result.report["exports"].get("coreai_compression"), "seconds": round(seconds, 1),
            "timings": timings, "assets": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes")
    ap.add_argument("--compression", nargs="+", default=['{"scheme": "palettize", "bits": 4}', '{"scheme": "w8a8"}'],
                    help="recipe export.compression values (JSON), one compressed export each")
    ap.add_argument("--target", default="iphone-15-pro", help="A17 Pro: computes int8, so w8a8 is not refused")
    args = ap.parse_args()

    import coreai_opt
    import coreai_torch
    import torchao

    runs = {"fp32": export(args.model, None, args.target), "fp16": export(args.model, {"scheme": "fp16"}, args.target)}
    for spec in args.compression:
        comp = json.loads(spec)
        runs[comp["scheme"] + (f"-{comp['bits']:g}" if "bits" in comp else "")] = export(args.model, comp, args.target)
    fp16 = {r["package"]: r["bytes"] for r in runs["fp16"]["assets"]}
    print(f"{'run':11s} {'asset':12s} {'scheme':10s} {'bits':>5s} {'MB':>7s} {'/fp16':>6s} {'PSNR dB':>8s} {'rel err':>9s} "
          f"{'sim err':>9s} {'vs sim':>9s}")
    for name, run in runs.items():
        for r in run["assets"]:
            c = r.get("compression", {})
            psnr = r.get("coreai_runtime_psnr_db", float("nan"))
            print(f"{name:11s} {r['package']:12s} {c.get('scheme', 'fp32'):10s} {c.get('measured_bits', c.get('weight_bits', 32)):5.2f} {r['bytes'] / 1e6:7.2f} "
                  f"{r['bytes'] / fp16[r['package']]:6.2f} {float(psnr):8.1f} {r['coreai_runtime_relative_error']:9.1e} "
                  f"{r.get('simulation_relative_error', float('nan')):9.1e} "
                  f"{r.get('coreai_runtime_vs_simulation_relative_error', float('nan')):9.1e}")
        print(f"{name:11s} {run['seconds']:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"lowering_coreai_{args.model.replace(':', '_')}.json"
    out.write_text(json.dumps({"model": args.model, "target": args.target, "coreai_torch": coreai_torch.__version__,
                               "coreai_opt": coreai_opt.__version__, "torchao": torchao.__version__,
                               "machine": platform.machine(), "cpus": os.cpu_count(),
                               "note": "CPU shared with other jobs: seconds are noisy; sizes and errors are not",
                               "runs": runs, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
