"""Full-size SD-v1.5 UNet lowered for iPhone 12 Pro Max as Apple's Swift pipeline loads it: UnetChunk1/UnetChunk2
(cut tensors named alike), palettized, checked with ``snapopt check apple``.

Each scheme runs in its own process (``snapopt.lowering.export.lower_exports`` on arch:sd-v1.5's UNet, random
weights), so peak memory (ru_maxrss) is per scheme. Prints a table, saves JSON to bench/results/.

    python bench/lowering_sd15_chunked.py [--schemes 6,4] [--target iphone-12-pro-max] [--resolution 512]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(bits: int, target: str, model: str, resolution: int) -> None:
    from snapopt.lowering.export import lower_exports, per_model_limit_mb
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model
    from snapopt.recipe import validate_recipe

    resolved = validate_recipe({"name": "bench", "model": model, "targets": [target], "export": {
        "components": ["unet"], "onnx": False, "weight_bits": bits, "chunk_unet": True}})
    pipe = load_model(model, components=["unet"], seed=0)
    stages = {}

    @contextlib.contextmanager
    def stage(name):
        t0 = time.perf_counter()
        yield
        stages[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: {stages[name]} s", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = lower_exports(pipe, resolved, Shapes(resolution=resolution, batch=2), Path(tmp) / "exports", stage)
        seconds = time.perf_counter() - t0
    limit = per_model_limit_mb(resolved.targets)
    chunks = {e["package"]: e["bytes"] for e in res["coreml"]}
    print("RESULT " + json.dumps({
        "bits": bits, "seconds": seconds, "stages": stages, "chunk_bytes": chunks, "limit_mb": limit,
        "under_limit": all(b <= limit * 1e6 for b in chunks.values()), "chunking": res["unet_chunking"],
        "apple_check": {"passed": res["apple_check"]["passed"], "problems": res["apple_check"]["problems"]},
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="6,4", help="palettization bits per run, comma-separated (16: fp16)")
    ap.add_argument("--target", default="iphone-12-pro-max")
    ap.add_argument("--model", default="arch:sd-v1.5")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child, args.target, args.model, args.resolution)
    rows = {}
    for bits in [int(b) for b in args.schemes.split(",")]:
        print(f"lowering {args.model} UNet, chunked, {bits}-bit …", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", str(bits), "--target", args.target, "--model", args.model,
                               "--resolution", str(args.resolution)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        rows[bits] = json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    print(f"{'bits':>4s} {'chunk1 MB':>10s} {'chunk2 MB':>10s} {'limit MB':>9s} {'seconds':>8s} {'peak GB':>8s}  check")
    for bits, r in rows.items():
        if "error" in r:
            print(f"{bits:4d} error: {r['error']}")
            continue
        c = r["chunk_bytes"]
        print(f"{bits:4d} {c.get('UnetChunk1', 0) / 1e6:10.1f} {c.get('UnetChunk2', 0) / 1e6:10.1f} {r['limit_mb']:9.0f} "
              f"{r['seconds']:8.0f} {r['peak_rss_gb']:8.2f}  {'passed' if r['apple_check']['passed'] else r['apple_check']['problems']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"lowering_chunked_{args.model.replace(':', '_')}_{args.target}.json"
    out.write_text(json.dumps({"model": args.model, "target": args.target, "resolution": args.resolution,
                               "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "results": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
