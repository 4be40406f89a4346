"""Compare weight compression schemes on the zoo model: fp16, int8, 8/6/4-bit palettization, mixed-bit, W8A8.

Per scheme: average stored bits of the UNet, UNet output PSNR against fp (weights simulated in torch), FID / CLIP /
attribute accuracy on held-out prompts (--eval-prompts, 0 to skip), predicted UNet latency per target (cost model
at the stored bits), predicted UNet package size and, with --packages, the real Core ML UNet package size.

    python bench/compression_schemes.py --eval-prompts 8 --packages
writes bench/results/compression_schemes_zoo.json. CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes")
    ap.add_argument("--targets", default="iphone-12-mini,iphone-14-pro,iphone-15-pro")
    ap.add_argument("--mixed", default="4.5,3", help="mixed-bit target averages")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-steps", type=int, default=25)
    ap.add_argument("--probe-prompts", type=int, default=2, help="prompts of the PSNR probe (x 3 timesteps)")
    ap.add_argument("--schemes", default="fp16,int8,palettize8,palettize6,palettize4,mixed,w8a8",
                    help="subset to run (mixed runs every --mixed average)")
    ap.add_argument("--sensitivity-from", default=None, help="reuse the sensitivity table of an earlier run's JSON")
    ap.add_argument("--packages", action="store_true", help="also lower each scheme's UNet to Core ML and measure the package")
    ap.add_argument("--out", default=str(ROOT / "bench/results/compression_schemes_zoo.json"))
    args = ap.parse_args()

    import torch

    from snapopt.capture import block_graph
    from snapopt.devices.registry import TARGETS
    from snapopt.lowering import compression as cmp
    from snapopt.lowering import schemes
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model

    torch.manual_seed(0)
    say = lambda m: print(f"[bench] {m}", flush=True)  # noqa: E731
    pipe = load_model(args.model)
    shapes = Shapes(resolution=pipe.resolution, batch=2)
    targets = [TARGETS.resolve(t) for t in args.targets.split(",")]
    graph = block_graph(pipe, "unet", shapes)
    probe = cmp.UnetProbe.prepare(pipe, latent=shapes.latent(pipe), prompts=args.probe_prompts)
    t0 = time.perf_counter()
    if args.sensitivity_from:
        j = json.loads(Path(args.sensitivity_from).read_text())["sensitivity"]
        sens = cmp.Sensitivity({n: {int(b): float(v) for b, v in d.items()} for n, d in j["psnr_db"].items()}, j["sizes"],
                               j.get("fixed_layers", {}), j.get("seconds", 0.0))
        say(f"sensitivity from {args.sensitivity_from}")
    else:
        sens = cmp.sensitivity(pipe.unet, probe, progress=say)
    say(f"sensitivity: {len(sens.psnr)} layers x {len(cmp.NBITS)} widths in {sens.seconds:.0f} s")
    plans = [{"scheme": "fp16", "bits": 16}, {"scheme": "int8", "bits": 8}]
    plans += [{"scheme": "palettize", "bits": b, "group_size": 0} for b in (8, 6, 4)]
    plans += [{"scheme": "mixed", "bits": float(b)} for b in args.mixed.split(",")]
    plans += [{"scheme": "w8a8", "bits": 8}]
    wanted = set(args.schemes.split(","))
    plans = [p for p in plans if p["scheme"] in wanted or f"{p['scheme']}{p['bits']:g}" in wanted]
    rows, evals = [], {}
    for plan in plans:
        plan = {**plan, "quality": "eval" if args.eval_prompts else "psnr", "eval_prompts": max(2, args.eval_prompts),
                "eval_steps": args.eval_steps}
        t = time.perf_counter()
        plan = schemes.prepare_scheme(pipe, shapes, plan, probe=probe, sens=sens)
        res = schemes.measure(pipe, plan, probe, graph, targets, package_mb=None, say=say)
        row = res.to_json() | {"seconds": round(time.perf_counter() - t, 1)}
        if plan["scheme"] == "mixed":
            row |= {k: plan[k] for k in ("psnr_threshold_db", "average_bits", "bits_histogram")}
        if args.packages:
            row["coreml_unet_mb"] = _package_mb(pipe, shapes, plan, targets)
        rows.append(row)
        say(f"{row['scheme']}: {row['bits']:.2f} bits, PSNR {row['psnr_db']} dB, "
            f"{', '.join(f'{k} {v:.1f} ms' for k, v in row['latency_ms'].items())}"
            + (f", FID {row['quality']['compressed']['fid']:.1f} attr {row['quality']['compressed']['attribute_accuracy']:.3f}"
               if row.get("quality") else "") + (f", package {row['coreml_unet_mb']:.2f} MB" if "coreml_unet_mb" in row else ""))
    out = {"model": pipe.source, "resolution": pipe.resolution, "targets": [t.id for t in targets],
           "probe_inputs": int(probe.inputs[0].shape[0]), "sensitivity_seconds": round(sens.seconds, 1),
           "sensitivity": sens.to_json(), "schemes": rows, "seconds": round(time.perf_counter() - t0, 1),
           "command": "python bench/compression_schemes.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "packages")) + (" --packages" if args.packages else ""),
           "note": "CPU, 2 shared cores: seconds are noisy; latency is the cost model's prediction (W8A8 priced at int8 weights only)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    say(f"wrote {args.out}")


def _package_mb(pipe, shapes, plan, targets) -> float:
    from snapopt.lowering.coreml import lower_component

    target = min(targets, key=lambda t: t.ios_major)
    with tempfile.TemporaryDirectory() as d:
        info = lower_component(pipe, "unet", shapes, Path(d), compression=plan,
                               deployment_target=target.coreml_deployment_target())
    return round(info["bytes"] / 1e6, 3)


if __name__ == "__main__":
    main()
