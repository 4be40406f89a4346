"""Where the exports after training spend their time, before and after issue 15's changes, in one process.

On zoo:snapshapes with Apple's split-einsum attention (what recipes/snapfusion*.yaml lower; unpruned here):

1. the UNet's ONNX export, stage by stage: ``torch.export``; ``torch.onnx.export`` + onnxscript's optimizer with its
   default rules (before) and without the quadratic multi-output rule (after; the bytes are compared); onnxsim;
   the ONNX Runtime check (torch reference forward vs ONNX Runtime session + run);
2. ``lower_exports`` (Core ML + ONNX for unet, vae_decoder, text_encoder, as the recipe exports them): serial
   (each component traced once for both) and with the ONNX worker process (``--modes``), stage timings each.

3. ``--e2e REF``: ``snapopt apply`` of a split-einsum-only recipe on zoo:snapshapes (no training: the stages after
   training are what is timed) with the code at git ``REF`` (before), then with this tree serial
   (``SNAPOPT_EXPORT_WORKER=0``) and with the ONNX worker (``=1``), back to back; per-stage timings of each, and
   whether the ONNX files are the same bytes and the Core ML specs equal.

Shared machines are noisy: compare modes of the same run (ratios), not runs. Prints, saves JSON to bench/results/.

    python bench/export_timing.py [--modes serial,parallel] [--skip-onnx-stages] [--tag NAME]
    python bench/export_timing.py --e2e 9035c21 [--tag NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def zoo_split_einsum():
    from snapopt.models import load_model
    from snapopt.models.attention import set_attention

    pipe = load_model("zoo:snapshapes", seed=0)
    set_attention(pipe.unet, "split_einsum")
    return pipe


def onnx_stages(pipe, shapes) -> dict:
    """The UNet's ONNX export timed stage by stage, default optimizer against the fast one."""
    import onnxruntime as ort
    import onnxsim
    import torch

    from snapopt.capture.export import export_component
    from snapopt.lowering.apple import apple_io
    from snapopt.lowering.onnx import to_onnx

    io = apple_io(pipe, "unet", shapes)
    out: dict = {}
    t = time.perf_counter()
    ep = export_component(io)
    out["torch.export"] = time.perf_counter() - t
    protos = {}
    for label, fast in (("default", False), ("fast", True)):
        t = time.perf_counter()
        proto = to_onnx(ep, io.example_inputs, io.input_names, io.output_names, fast=fast).model_proto
        out[f"torch.onnx.export + optimizer ({label})"] = time.perf_counter() - t
        protos[label] = proto
    t = time.perf_counter()
    simplified = {k: onnxsim.simplify(v)[0] for k, v in protos.items()}
    out["onnxsim (x2)"] = time.perf_counter() - t
    out["same bytes after onnxsim"] = simplified["default"].SerializeToString() == simplified["fast"].SerializeToString()
    out["nodes"] = len(simplified["fast"].graph.node)
    t = time.perf_counter()
    with torch.no_grad():
        io.module(*io.example_inputs)
    out["check: torch reference forward"] = time.perf_counter() - t
    t = time.perf_counter()
    sess = ort.InferenceSession(simplified["fast"].SerializeToString(), providers=["CPUExecutionProvider"])
    sess.run(None, {n: x.numpy() for n, x in zip(io.input_names, io.example_inputs)})
    out["check: onnxruntime session + run"] = time.perf_counter() - t
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def lower(pipe, shapes, parallel: bool) -> dict:
    from snapopt.lowering.export import lower_exports
    from snapopt.recipe import validate_recipe

    resolved = validate_recipe({"name": "bench", "model": "zoo:snapshapes", "targets": ["iphone-14-pro", "iphone-15-pro"],
                                "export": {"coreml": True, "onnx": True, "components": ["unet", "vae_decoder", "text_encoder"]}})
    stages: dict = {}

    @contextlib.contextmanager
    def stage(name):
        print(f"  [{'parallel' if parallel else 'serial'}] {name}", flush=True)
        t0 = time.perf_counter()
        yield
        stages[name] = round(time.perf_counter() - t0, 2)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = lower_exports(pipe, resolved, shapes, Path(tmp) / "exports", stage, parallel=parallel)
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "stages": stages, "parallel_note": result.get("parallel", {}).get("note"),
            "onnx_relative_errors": {e["package"]: e["onnxruntime_relative_error"] for e in result["onnx"]}}


E2E_RECIPE = """name: export-timing
model: zoo:snapshapes
batch: 2
seed: 0
passes:
  - pass: attention_split_einsum
    options: {component: unet}
targets: [iphone-14-pro, iphone-15-pro]
export: {coreml: true, onnx: true, components: [unet, vae_decoder, text_encoder]}
"""


def e2e(ref: str) -> dict:
    """``snapopt apply`` before (git ``ref``) and after (this tree, serial and with the worker), back to back."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out: dict = {"before_ref": ref, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "recipe.yaml").write_text(E2E_RECIPE)
        old = tmp / "src_before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(repo), "archive", ref], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        cli = [sys.executable, "-c", "from snapopt.cli import main; main()", "apply", str(tmp / "recipe.yaml"), "--out"]
        runs = {"before": ({"PYTHONPATH": str(old)}, tmp), "after_serial": ({"SNAPOPT_EXPORT_WORKER": "0"}, repo),
                "after_worker": ({"SNAPOPT_EXPORT_WORKER": "1"}, repo)}
        for name, (env, cwd) in runs.items():
            print(f"snapopt apply ({name})", flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cli + [str(tmp / name)], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"snapopt apply ({name}) exited {done.returncode}: {done.stderr.strip()[-2000:]}")
            report = json.loads((tmp / name / "report.json").read_text())
            out["runs"][name] = {"wall_s": round(time.perf_counter() - t0, 1), "report_seconds": round(report["seconds"], 1),
                                 "timings": report["timings"]}
            print(f"  {out['runs'][name]['report_seconds']} s")
        same = {}
        for f in ("Unet", "VAEDecoder", "TextEncoder"):
            a = (tmp / "before" / "exports" / "onnx" / f"{f}.onnx").read_bytes()
            same[f"{f}.onnx"] = all((tmp / n / "exports" / "onnx" / f"{f}.onnx").read_bytes() == a for n in ("after_serial", "after_worker"))
            from snapopt.lowering.coreml import import_coremltools

            ct = import_coremltools()
            spec = ct.utils.load_spec(str(tmp / "before" / "exports" / "coreml" / f"{f}.mlpackage"))
            same[f"{f}.mlpackage spec"] = all(ct.utils.load_spec(str(tmp / n / "exports" / "coreml" / f"{f}.mlpackage")) == spec
                                              for n in ("after_serial", "after_worker"))
        out["same_outputs"] = same
    out["before_over_after"] = {n: round(out["runs"]["before"]["report_seconds"] / out["runs"][n]["report_seconds"], 2)
                                for n in ("after_serial", "after_worker")}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="serial,parallel")
    ap.add_argument("--skip-onnx-stages", action="store_true")
    ap.add_argument("--tag", default=platform.node().split(".")[0] or "host")
    ap.add_argument("--e2e", metavar="REF", help="time snapopt apply at git REF against this tree instead")
    a = ap.parse_args(argv)
    if a.e2e:
        report = {"cpus": os.cpu_count(), "load_average": list(os.getloadavg()),
                  "command": "python bench/export_timing.py " + " ".join(argv or []), **e2e(a.e2e)}
        print(json.dumps({k: report[k] for k in ("before_over_after", "same_outputs")}, indent=1))
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"export_timing_e2e_{a.tag}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"saved {path.relative_to(RESULTS.parent.parent)}")
        return report
    from snapopt.lowering.interfaces import Shapes

    pipe = zoo_split_einsum()
    shapes = Shapes(resolution=pipe.resolution, batch=2)
    report: dict = {"model": "zoo:snapshapes + split_einsum attention", "cpus": os.cpu_count(),
                    "load_average": list(os.getloadavg()), "command": "python bench/export_timing.py " + " ".join(argv or [])}
    if not a.skip_onnx_stages:
        print("UNet ONNX export, stage by stage", flush=True)
        report["onnx_unet_stages_s"] = onnx_stages(pipe, shapes)
        for k, v in report["onnx_unet_stages_s"].items():
            print(f"  {k:45s} {v}")
    report["lower_exports"] = {}
    for mode in [m for m in a.modes.split(",") if m]:
        print(f"lower_exports ({mode})", flush=True)
        report["lower_exports"][mode] = lower(pipe, shapes, parallel=mode == "parallel")
        print(f"  wall {report['lower_exports'][mode]['wall_s']} s")
    modes = report["lower_exports"]
    if {"serial", "parallel"} <= set(modes):
        report["parallel_over_serial"] = round(modes["serial"]["wall_s"] / modes["parallel"]["wall_s"], 2)
        print(f"serial / parallel wall: {report['parallel_over_serial']}x")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"export_timing_{a.tag}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"saved {path.relative_to(RESULTS.parent.parent)}")
    return report


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
