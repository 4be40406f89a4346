"""Lower the full-size SD-v1.5 UNet (arch preset, random weights) to Core ML on this machine.

Compares snapopt's lowering (`snapopt.lowering.coreml.lower_component`: Apple's interface, fp16, iOS target)
against a bare coremltools conversion of the same model written the obvious way by hand (torch.export →
run_decompositions → ct.convert), in the same run. Each conversion runs in its own process, so peak memory
(ru_maxrss) is measured per conversion. Prints a table and saves JSON to bench/results/.

    python bench/coreml_lowering_sd15.py [--model arch:sd-v1.5] [--resolution 512] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def snapopt_convert(model: str, resolution: int, batch: int, out: Path) -> dict:
    from snapopt.devices.registry import TARGETS
    from snapopt.lowering.coreml import lower_component
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model

    pipe = load_model(model, components=["unet"], seed=0)
    t0 = time.perf_counter()
    info = lower_component(pipe, "unet", Shapes(resolution=resolution, batch=batch), out,
                           deployment_target=TARGETS.resolve("iphone-14-pro").coreml_deployment_target())
    return {"seconds": time.perf_counter() - t0, "bytes": info["bytes"], "inputs": info["inputs"], "outputs": info["outputs"]}


def bare_convert(model: str, resolution: int, batch: int, out: Path) -> dict:
    import coremltools as ct
    import torch

    from snapopt.models import load_model

    unet = load_model(model, components=["unet"], seed=0).unet

    class Wrapper(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    lat = resolution // 8
    args = (torch.randn(batch, 4, lat, lat), torch.full((batch,), 981.0), torch.randn(batch, 77, unet.config.cross_attention_dim))
    t0 = time.perf_counter()
    ep = torch.export.export(Wrapper(unet).eval(), args, strict=False).run_decompositions({})
    mlmodel = ct.convert(ep, inputs=[ct.TensorType(name=n, shape=a.shape) for n, a in zip(["sample", "timestep", "encoder_hidden_states"], args)],
                         convert_to="mlprogram", compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS17,
                         skip_model_load=True)
    path = out / "Bare.mlpackage"
    mlmodel.save(str(path))
    return {"seconds": time.perf_counter() - t0, "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}


def child(kind: str, model: str, resolution: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fn = snapopt_convert if kind == "snapopt" else bare_convert
        result = fn(model, resolution, batch, Path(tmp))
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="arch:sd-v1.5")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--child", choices=["snapopt", "bare"])
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.resolution, args.batch)
    rows = {}
    for kind in ("bare", "snapopt"):
        print(f"converting with {kind} …", flush=True)
        wall = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--model", args.model, "--resolution",
                               str(args.resolution), "--batch", str(args.batch)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            rows[kind] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            rows[kind] = json.loads(line[7:]) | {"process_seconds": time.perf_counter() - wall}
    ok = all("error" not in r for r in rows.values())
    summary = {
        "model": args.model, "resolution": args.resolution, "batch": args.batch, "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(), "results": rows,
        "time_ratio_snapopt_over_bare": rows["snapopt"]["seconds"] / rows["bare"]["seconds"] if ok else None,
        "memory_ratio_snapopt_over_bare": rows["snapopt"]["peak_rss_gb"] / rows["bare"]["peak_rss_gb"] if ok else None,
    }
    print(f"{'path':10s} {'convert s':>10s} {'peak RSS GB':>12s} {'package MB':>11s}")
    for kind, r in rows.items():
        if "error" in r:
            print(f"{kind:10s} error: {r['error']}")
        else:
            print(f"{kind:10s} {r['seconds']:10.1f} {r['peak_rss_gb']:12.2f} {r['bytes'] / 1e6:11.1f}")
    if ok:
        print(f"snapopt / bare: time ×{summary['time_ratio_snapopt_over_bare']:.2f}, peak memory ×{summary['memory_ratio_snapopt_over_bare']:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"coreml_lowering_{args.model.replace(':', '_')}_{args.resolution}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2))
    print(f"saved {RESULTS / name}")


if __name__ == "__main__":
    main()
