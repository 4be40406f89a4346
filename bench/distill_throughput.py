"""Distillation throughput: SD-v1.5 teacher -> BK-SDM-Small student (random weights), one GPU.

Measures images/s and model FLOPs utilisation of snapopt's recovery trainer (bf16 autocast on CUDA,
output + stage-feature KD, EMA) against plain eager training loops in the same run (fp32, and bf16
autocast without KD hooks or EMA). FLOPs per image: student MACs x 2 x 3 (forward + backward) plus the
teacher's forward MACs x 2; MACs from snapopt.capture.block_graph at the training resolution (with the
attention matmuls). MFU is against the GPU's dense bf16 peak.

    python bench/distill_throughput.py                 # on the GPU
    python bench/distill_throughput.py --tiny --steps 3 --batch 2   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core bf16, SXM


def bk_small_blocks() -> list[str]:
    recipe = yaml.safe_load((ROOT / "recipes" / "bk-sdm-small.yaml").read_text())
    return next(p["options"]["blocks"] for p in recipe["passes"] if p["pass"] == "remove_blocks")


def macs(ref: str, blocks: list[str] | None, resolution: int) -> int:
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks

    pipe = load_model(ref, components=("unet",), structure_only=True)
    if blocks:
        RemoveBlocks({"component": "unet", "blocks": blocks}).run(pipe, None)
    return block_graph(pipe, "unet", Shapes(resolution=resolution, batch=1)).totals()["macs"]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def plain_loop(teacher, student, batch: int, steps: int, device, bf16: bool) -> float:
    """The loop one would write by hand: teacher forward, student forward/backward, AdamW. Returns images/s."""
    from contextlib import nullcontext

    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
    lat = teacher.config.sample_size
    lat = lat[0] if isinstance(lat, (list, tuple)) else lat
    dim = teacher.config.cross_attention_dim
    x = torch.randn(batch, 4, lat, lat, device=device)
    noise = torch.randn_like(x)
    ctx = torch.randn(batch, 77, dim, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with cast:
            with torch.no_grad():
                ref = teacher(x, t, ctx, return_dict=False)[0]
            out = student(x, t, ctx, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out.float(), noise) + torch.nn.functional.mse_loss(out.float(), ref.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return batch * len(times) / sum(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="arch:tiny on CPU (smoke test)")
    ap.add_argument("--teacher", default="arch:sd-v1.5", help="teacher model (arch:, zoo:, folder); default full-size SD-v1.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    ref = "arch:tiny" if args.tiny else args.teacher
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    blocks = bk_small_blocks()
    teacher = load_model(ref, components=("unet",), seed=0)
    resolution = teacher.resolution
    mac_t, mac_s = macs(ref, None, resolution), macs(ref, blocks, resolution)
    flops_per_image = 2 * 3 * mac_s + 2 * mac_t
    student = teacher.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": blocks}).run(student, None)
    teacher.to(device)
    student.to(device)
    teacher.unet.eval()
    peak = peak_flops(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "teacher": ref,
               "student": "bk-sdm-small (recipes/bk-sdm-small.yaml)", "resolution": resolution, "batch": args.batch,
               "steps": args.steps, "teacher_gmacs": mac_t / 1e9, "student_gmacs": mac_s / 1e9,
               "student_params": sum(p.numel() for p in student.unet.parameters()),
               "flops_per_image_student_fwd_bwd": 6 * mac_s, "flops_per_image_with_teacher_fwd": flops_per_image,
               "peak_bf16_flops": peak, "runs": {}}

    def record(name, ips):
        entry = {"images_per_s": round(ips, 3), "tflops": round(ips * flops_per_image / 1e12, 3)}
        if peak:
            entry["mfu"] = round(ips * flops_per_image / peak, 4)
            entry["mfu_student_only"] = round(ips * 6 * mac_s / peak, 4)
        results["runs"][name] = entry
        print(f"{name:28s} {ips:8.2f} img/s  {entry['tflops']:8.2f} TFLOP/s  MFU {entry.get('mfu', 'n/a')}", flush=True)

    o = TrainOptions(steps=args.steps + 1, batch=args.batch, progress=False, ema=0.9999, device=str(device),
                     gradient_checkpointing=args.gradient_checkpointing, optim=dict(lr=1e-5))
    obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res = Trainer(obj, o, None, device=device).run()
    obj.close()
    record("snapopt_trainer_bf16_kd_ema", res.images_per_second)
    if device.type == "cuda":
        results["runs"]["snapopt_trainer_bf16_kd_ema"]["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    record("plain_eager_fp32", plain_loop(teacher.unet, student.unet, args.batch, args.steps, device, bf16=False))
    if device.type == "cuda":
        record("plain_eager_bf16", plain_loop(teacher.unet, student.unet, args.batch, args.steps, device, bf16=True))

    tag = "tiny" if args.tiny else ("" if ref == "arch:sd-v1.5" else ref.replace(":", "_").replace("/", "_"))
    out = args.out or ROOT / "bench" / "results" / f"distill_throughput{'_' + tag if tag else ''}_b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
