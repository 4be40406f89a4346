"""Data-parallel scaling of a training job: the same spec on 1 GPU and on K GPUs (torchrun, DDP) at equal
global batch. Every rank draws the same global batch from the step's seed and keeps its slice, so the two
runs train the same thing; this checks that the loss curves agree and measures the throughput ratio.

    python bench/ddp_scaling.py snapopt/train/specs/recover-bk-sdm-small-snapshapes.yaml --gpus 2 --steps 400 --batch 512
    python bench/ddp_scaling.py SPEC --gpus 2 --steps 4 --batch 4 --cpu      # gloo on CPU (smoke test)
    python bench/ddp_scaling.py snapopt/train/specs/recover-bk-sdm-small-sd15.yaml --gpus 2 --steps 40 --batch 64 --parallel fsdp

Writes ``<out>/ddp_scaling.json`` (images/s each way, the speed-up, loss agreement, each rank's peak GPU
memory) and ``ddp_scaling.png`` (both loss curves and their relative difference). Evaluations are switched off and no model is saved:
only the training loop is compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def training_spec(spec: Path, batch: int | None, parallel: str = "ddp") -> dict:
    """The spec with evaluations, checkpoints, progress bars and the saved model switched off;
    ``parallel``: how the K-process run splits the work (ddp, or fsdp: FSDP2 sharding)."""
    s = yaml.safe_load(spec.read_text())
    opts = s.setdefault("options", {})
    opts.setdefault("train", {}).update(checkpoint_every=0, progress=False, parallel=parallel)
    if batch:
        opts["train"]["batch"] = batch
    if "zoo_eval_prompts" in opts:
        opts["zoo_eval_prompts"] = 0
    if "eval_prompts" in opts:
        opts["eval_prompts"] = 1
    s["save_model"] = False
    return s


def worker(spec_file: Path, out: Path, steps: int, device: str) -> None:
    """One rank of a measured run: the training CLI's job, then this rank's peak GPU memory next to it
    (``peak_mem_rank<r>.json``; the trainer's stats do not record memory)."""
    import torch

    from snapopt.train.cli import run_spec

    run_spec(spec_file, out, steps=steps, device=device)
    import torch.distributed as tdist

    rank = tdist.get_rank() if tdist.is_initialized() else 0
    if torch.cuda.is_available() and device == "cuda":
        peak = {"rank": rank, "max_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
                "max_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3)}
        (out / f"peak_mem_rank{rank}.json").write_text(json.dumps(peak))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def run(spec_file: Path, out: Path, gpus: int, steps: int, cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    train = [str(Path(__file__).resolve()), "--worker", str(spec_file), "--out", str(out), "--steps", str(steps)]
    if cpu:
        train.append("--cpu")
    if gpus == 1:
        cmd = [sys.executable, *train]
        if not cpu:
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *train]
    # the command as a reader would type it: no interpreter path, repo-relative script, scratch folder as <tmp>
    shown = ["python" if c == sys.executable else os.path.relpath(c, ROOT) if str(c).startswith(str(ROOT)) else str(c) for c in cmd]
    print("$", " ".join(shown).replace(str(Path(out).parent), "<tmp>"), flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    result = json.loads((out / "result.json").read_text())
    with open(out / "losses.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    peaks = [json.loads(f.read_text()) for f in sorted(out.glob("peak_mem_rank*.json"))]
    return {"stats": result["stats"], "losses": rows, "peak_mem": peaks}


def compare(one: list[dict], many: list[dict]) -> dict:
    by_step = {int(r["step"]): r["loss"] for r in many}
    pairs = [(r["loss"], by_step[int(r["step"])]) for r in one if int(r["step"]) in by_step]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in pairs]
    tail = rel[len(rel) // 2:]
    return {"compared_steps": len(pairs), "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
            "mean_rel_diff_second_half": sum(tail) / len(tail), "loss_first": [pairs[0][0], pairs[0][1]],
            "loss_last": [pairs[-1][0], pairs[-1][1]]}


def plot(path: Path, one: list[dict], many: list[dict], gpus: int, title: str, parallel: str = "ddp") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    s1, l1 = [r["step"] for r in one], [r["loss"] for r in one]
    sk, lk = [r["step"] for r in many], [r["loss"] for r in many]
    a.plot(s1, l1, label="1 GPU", lw=1.4)
    a.plot(sk, lk, label=f"{gpus} GPUs ({parallel.upper()})", lw=1.0, ls="--")
    a.set_yscale("log")
    a.set_ylabel("loss")
    a.set_title(title)
    a.legend()
    a.grid(alpha=0.3)
    by = dict(zip(sk, lk))
    b.plot(s1, [abs(x - by.get(s, float("nan"))) / abs(x) for s, x in zip(s1, l1)], lw=0.8, color="k")
    b.set_yscale("log")
    b.set_ylabel("|rel. diff|")
    b.set_xlabel("step")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: the spec's)")
    ap.add_argument("--cpu", action="store_true", help="gloo processes on CPU instead of GPUs")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="the K-process run: DDP or FSDP2 (train.parallel)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ddp_scaling")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one rank of a measured run
    args = ap.parse_args()
    if args.worker:
        return worker(args.spec, args.out, args.steps, "cpu" if args.cpu else "cuda")

    spec = training_spec(args.spec, args.batch, args.parallel)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec_file = tmp / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        one = run(spec_file, tmp / "one", 1, args.steps, args.cpu)
        many = run(spec_file, tmp / "many", args.gpus, args.steps, args.cpu)
    ips1, ipsk = one["stats"]["images_per_second"], many["stats"]["images_per_second"]
    import torch

    result = {"spec": str(args.spec), "job": spec["job"], "steps": args.steps, "global_batch": spec["options"]["train"]["batch"],
              "gpus": args.gpus, "parallel": args.parallel, "device": "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0),
              "images_per_second": {"1": ips1, str(args.gpus): ipsk},
              "speedup": round(ipsk / ips1, 3) if ips1 and ipsk else None,
              "scaling_efficiency": round(ipsk / ips1 / args.gpus, 3) if ips1 and ipsk else None,
              "seconds": {"1": one["stats"]["seconds"], str(args.gpus): many["stats"]["seconds"]},
              "loss_agreement": compare(one["losses"], many["losses"]),
              "peak_mem": {"1": one["peak_mem"], str(args.gpus): many["peak_mem"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp_scaling.json").write_text(json.dumps(result, indent=1))
    (args.out / "losses_1.csv").write_text("step,loss\n" + "".join(f"{int(r['step'])},{r['loss']}\n" for r in one["losses"]))
    (args.out / f"losses_{args.gpus}.csv").write_text("step,loss\n" + "".join(f"{int(r['step'])},{r['loss']}\n" for r in many["losses"]))
    plot(args.out / "ddp_scaling.png", one["losses"], many["losses"], args.gpus,
         f"{spec['job']}: 1 vs {args.gpus} GPUs ({args.parallel}), global batch {result['global_batch']}", args.parallel)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
