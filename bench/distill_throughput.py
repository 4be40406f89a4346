"""Distillation throughput: SD-v1.5 teacher -> BK-SDM-Small student (random weights), one GPU, per
trainer configuration side by side in one run (issue 15).

Each configuration is snapopt's recovery trainer (bf16 autocast on CUDA, output + stage-feature KD, EMA)
with different speed options, from the same start weights:

* ``eager``: the loop as it was: foreach AdamW, fp32 teacher under autocast, cuDNN heuristics
* ``fast``: the defaults now: fused AdamW, a bf16 teacher copy, cuDNN autotuning, no pageable host copies
* ``fast+channels_last``, ``fast+compile`` (Inductor), ``fast+compile-ro`` (Inductor + CUDA graphs),
  ``fast+compile-autotune`` (Inductor ``max-autotune-no-cudagraphs``: Triton GEMM/conv templates timed
  against cuBLAS/cuDNN), ``fast+compile-max-autotune`` (``max-autotune``: that plus CUDA graphs),
  ``fast+cudagraphs`` (CUDA graphs without Inductor), ``+flash_attn`` / ``+cudnn_attn`` / ``+efficient_attn``
  (``attention_backend``: one scaled_dot_product_attention kernel): ``--configs`` picks

``--batch`` takes a comma list (``32,64,96``): every configuration runs at every batch, in one process
and from the same start weights, so the rows compare; a batch that does not fit is recorded as such.
``NAME@B`` in ``--configs`` runs that configuration at batch B only, in the order given (so the costly
compiles can go last, and a run cut short keeps what it measured).

Per configuration: images/s (steady state, after a warm-up run that pays for compilation), MFU, peak memory,
warm-up seconds, and the first steps' losses against ``eager``'s (numerics unchanged). FLOPs per image:
student MACs x 2 x 3 (forward + backward) plus the teacher's forward MACs x 2; MACs from
snapopt.capture.block_graph at the training resolution (with the attention matmuls). MFU is against the GPU's
dense bf16 peak.

    python bench/distill_throughput.py --batch 32                      # SD-v1.5 scale, on the GPU
    python bench/distill_throughput.py --batch 32,64 --configs eager,fast+compile,fast+compile-autotune
    python bench/distill_throughput.py --configs eager@64,fast+compile@64,fast+compile-autotune@64,fast+compile@32
    python bench/distill_throughput.py --teacher zoo:snapshapes --batch 512 --configs eager,fast,fast+compile-ro
    python bench/distill_throughput.py --tiny --steps 2 --batch 2 --configs eager,fast   # CPU smoke test
    python bench/distill_throughput.py --configs fast@64,fast+compile@64 --profile 3  # + GPU time by kind of kernel
    python bench/distill_throughput.py --macs-only                                   # MACs per image (CPU, seconds)
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


def macs(ref: str, blocks: list[str] | None, resolution: int) -> dict[str, int]:
    """The UNet's MACs per image from its block graph: ``macs`` (all) and ``attention_macs`` (the attention
    matmuls inside it)."""
    from snapopt.capture import block_graph
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks

    pipe = load_model(ref, components=("unet",), structure_only=True)
    if blocks:
        RemoveBlocks({"component": "unet", "blocks": blocks}).run(pipe, None)
    totals = block_graph(pipe, "unet", Shapes(resolution=resolution, batch=1)).totals()
    return {k: totals[k] for k in ("macs", "attention_macs")}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


#: GPU kernel name -> what it does, first match wins (cuDNN, cuBLAS/CUTLASS, Inductor's Triton and ATen names)
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("optimizer + EMA", ("adam", "foreach", "lerp", "multi_tensor")),
    ("layout transforms", ("nchwtonhwc", "nhwctonchw")),
    ("convolution", ("conv", "implicit_gemm", "wgrad", "dgrad", "fprop", "cudnn")),
    ("matmul", ("gemm", "cutlass", "nvjet", "cublas", "matmul", "xmma", "sm90_", "sm80_")),
    ("normalisation", ("norm",)),
    ("copies + casts", ("copy", "fill", "memcpy", "memset", "catarray", "transpose")),  # not "cast": ATen's adds run in gpu_kernel_impl_nocast
    ("reductions", ("reduce", "sum", "mean")),
    ("elementwise", ("elementwise", "vectorized", "silu", "gelu", "mul", "add")),
]


def kernel_kind(name: str) -> str:
    """Inductor's Triton kernels are named after the ops they fuse ("triton_per_fused_native_group_norm_silu_3",
    "triton_poi_fused_add_convolution_7"): a fused normalisation or the rest, not the op named inside."""
    low = name.lower()
    if low.startswith("triton"):
        return "Triton, fused normalisation" if "norm" in low else "Triton, fused elementwise"
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_steps(obj, o, device, steps: int, attention_flops_per_step: float | None = None,
                  peak: float | None = None) -> dict:
    """Device time per training step by kind of kernel (torch.profiler over ``steps`` steps of the trainer):
    where the time between the matmuls and convolutions goes. On CPU (smoke test) the ops' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from snapopt.train import Trainer

    cuda = device.type == "cuda"
    o3 = o.model_copy(update={"steps": steps})
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        Trainer(obj, o3, None, device=device).run()
        if cuda:
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0) if cuda else ev.self_cpu_time_total
        if us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        kind = kernel_kind(ev.key)
        kinds[kind] = kinds.get(kind, 0.0) + us
        kernels.append((us, ev.key, kind, ev.count))
    total = sum(kinds.values()) or 1.0
    kernels.sort(key=lambda k: -k[0])
    order = sorted(kinds.items(), key=lambda kv: -kv[1])
    extra = {}
    if attention_flops_per_step and kinds.get("attention"):  # the attention kernels' own rate, by the MFU convention
        rate = attention_flops_per_step / (kinds["attention"] / 1e6 / steps)
        extra = {"attention_tflops_per_s": round(rate / 1e12, 1), **({"attention_fraction_of_peak": round(rate / peak, 4)} if peak else {})}
    return {**extra, "steps": steps, "clock": "gpu kernels" if cuda else "cpu ops", "ms_per_step": round(total / 1e3 / steps, 2),
            "by_kind_ms_per_step": {k: round(v / 1e3 / steps, 2) for k, v in order},
            "by_kind_share": {k: round(v / total, 4) for k, v in order},
            "top_kernels": [{"name": n[:160], "kind": k, "ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": c / steps}
                            for us, n, k, c in kernels[:25]]}


def print_macs(ref: str) -> None:
    """What the MFU and the profile's attention rate divide by: MACs per image, the attention matmuls among them."""
    from snapopt.models import load_model

    resolution = load_model(ref, components=("unet",), structure_only=True).resolution
    for role, blocks in (("teacher", None), ("student (BK-SDM-Small)", bk_small_blocks())):
        m = macs(ref, blocks, resolution)
        print(f"{role:24s} {m['macs'] / 1e9:8.2f} GMACs per image, attention {m['attention_macs'] / 1e9:7.2f} "
              f"({m['attention_macs'] / m['macs']:.1%})")


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


CONFIGS = {
    "eager": dict(fused_optimizer=False, teacher_precision="fp32", cudnn_benchmark=False),
    "fast": {},
    "fast+channels_last": dict(channels_last=True),
    "fast+compile": dict(compile={"mode": "default"}),
    "fast+compile+channels_last": dict(compile={"mode": "default"}, channels_last=True),
    "fast+compile-ro": dict(compile={"mode": "reduce-overhead"}),
    "fast+compile-autotune": dict(compile={"mode": "max-autotune-no-cudagraphs"}),
    "fast+compile-max-autotune": dict(compile={"mode": "max-autotune"}),
    "fast+cudagraphs": dict(compile={"backend": "cudagraphs"}),
    "fast+flash_attn": dict(attention_backend="flash"),
    "fast+cudnn_attn": dict(attention_backend="cudnn"),
    "fast+efficient_attn": dict(attention_backend="efficient"),
    "fast+compile+flash_attn": dict(compile={"mode": "default"}, attention_backend="flash"),
    "fast+compile+cudnn_attn": dict(compile={"mode": "default"}, attention_backend="cudnn"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="arch:tiny on CPU (smoke test)")
    ap.add_argument("--teacher", default="arch:sd-v1.5", help="teacher model (arch:, zoo:, folder); default full-size SD-v1.5")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="steps run first (compilation, CUDA-graph recording, autotuning)")
    ap.add_argument("--batch", default="32", help="batch size, or a comma list of them (each configuration at each)")
    ap.add_argument("--configs", default="eager,fast,fast+channels_last,fast+compile", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--plain", action="store_true", help="also the hand-written plain loops (fp32, bf16)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", type=int, default=0, help="after timing, profile this many steps per configuration: "
                                                           "GPU time per step by kind of kernel (CPU: ops' time)")
    ap.add_argument("--macs-only", action="store_true", help="print the teacher's and student's MACs per image (all and "
                                                                "attention) from their block graphs and stop (no GPU)")
    args = ap.parse_args()
    if args.macs_only:
        print_macs("arch:tiny" if args.tiny else args.teacher)
        return
    try:
        batches = [int(b) for b in args.batch.split(",")]
        if "@" in args.configs:  # (batch, configuration), in run order
            plan = [(int(c.partition("@")[2]) if "@" in c else b, c.partition("@")[0])
                    for c in args.configs.split(",") for b in ([0] if "@" in c else batches)]
        else:
            plan = [(b, c) for b in batches for c in args.configs.split(",")]
    except ValueError:
        ap.error(f"--batch / --configs NAME@B: expected integer batches, got {args.batch!r} / {args.configs!r}")
    unknown = [c for _, c in plan if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config {unknown[0]}; choose from {', '.join(CONFIGS)}")
    if any(b < 1 for b, _ in plan):
        ap.error("--batch: every batch must be at least 1")
    batches = list(dict.fromkeys(b for b, _ in plan))

    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.accel import reset_attention_backends
    from snapopt.train.recover import RecoverObjective

    ref = "arch:tiny" if args.tiny else args.teacher
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    blocks = bk_small_blocks()
    teacher = load_model(ref, components=("unet",), seed=0)
    resolution = teacher.resolution
    graph_t, graph_s = macs(ref, None, resolution), macs(ref, blocks, resolution)
    mac_t, mac_s = graph_t["macs"], graph_s["macs"]
    flops_per_image = 2 * 3 * mac_s + 2 * mac_t
    attention_flops_per_image = 2 * 3 * graph_s["attention_macs"] + 2 * graph_t["attention_macs"]
    student = teacher.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": blocks}).run(student, None)
    teacher.to(device)
    student.to(device)
    teacher.unet.eval()
    start = {k: v.clone() for k, v in student.unet.state_dict().items()}
    peak = peak_flops(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "teacher": ref,
               "student": "bk-sdm-small (recipes/bk-sdm-small.yaml)", "resolution": resolution, "batch": batches if len(batches) > 1 else batches[0],
               "steps": args.steps, "warmup_steps": args.warmup, "teacher_gmacs": mac_t / 1e9, "student_gmacs": mac_s / 1e9,
               "teacher_attention_gmacs": graph_t["attention_macs"] / 1e9, "student_attention_gmacs": graph_s["attention_macs"] / 1e9,
               "student_params": sum(p.numel() for p in student.unet.parameters()),
               "flops_per_image_student_fwd_bwd": 6 * mac_s, "flops_per_image_with_teacher_fwd": flops_per_image,
               "peak_bf16_flops": peak, "torch": torch.__version__, "runs": {}}

    def record(name, ips, **extra):
        entry = {"images_per_s": round(ips, 3), "tflops": round(ips * flops_per_image / 1e12, 3)}
        if peak:
            entry["mfu"] = round(ips * flops_per_image / peak, 4)
            entry["mfu_student_only"] = round(ips * 6 * mac_s / peak, 4)
        entry.update(extra)
        results["runs"][name] = entry
        print(f"{name:28s} {ips:8.2f} img/s  {entry['tflops']:8.2f} TFLOP/s  MFU {entry.get('mfu', 'n/a')}  "
              f"{ {k: v for k, v in extra.items() if k not in ('losses', 'profile')} }", flush=True)

    tag = "tiny" if args.tiny else ("" if ref == "arch:sd-v1.5" else ref.replace(":", "_").replace("/", "_"))
    card = results["device"].replace("NVIDIA ", "").split()[0].lower()
    bname = "-".join(map(str, batches))
    out = args.out or ROOT / "bench" / "results" / f"distill_throughput{'_' + tag if tag else ''}_b{bname}_{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ref_losses = {}
    for batch, name in plan:
        key = name if len(batches) == 1 else f"{name}@b{batch}"
        student.unet.load_state_dict(start)
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False  # sticky across configurations: each sets what it uses
            reset_attention_backends()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        o = TrainOptions(steps=args.warmup, batch=batch, progress=False, ema=0.9999, device=str(device),
                         gradient_checkpointing=args.gradient_checkpointing, optim=dict(lr=1e-5), **CONFIGS[name])
        obj = None
        try:
            obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
            t0 = time.perf_counter()
            warm = Trainer(obj, o, None, device=device).run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            warm_s = time.perf_counter() - t0
            o2 = o.model_copy(update={"steps": args.steps + 1})
            res = Trainer(obj, o2, None, device=device).run()
            prof = (profile_steps(obj, o2, device, args.profile, attention_flops_per_image * batch, peak)
                    if args.profile else None)
            obj.close()
        except torch.cuda.OutOfMemoryError as exc:  # the largest batch is part of what is measured
            results["runs"][key] = {"batch": batch, "error": f"out of memory: {str(exc)[:200]}"}
            print(f"{key:28s} out of memory", flush=True)
            if obj is not None:
                obj.close()  # its feature hooks on the shared teacher go with it
            del obj
            torch.cuda.empty_cache()
            continue
        losses = [r["loss"] for r in warm.history]
        extra = {"batch": batch, "warmup_seconds": round(warm_s, 2), "losses": losses}
        if device.type == "cuda":
            extra["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if prof is not None:
            extra["profile"] = prof
            print(f"{key}: {prof['clock']} {prof['ms_per_step']} ms/step; " +
                  ", ".join(f"{k} {v:.0%}" for k, v in prof["by_kind_share"].items()), flush=True)
        if batch not in ref_losses:  # the first configuration at this batch is the reference (same data)
            ref_losses[batch] = losses
        else:
            extra["loss_rel_diff_vs_first"] = round(max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses[batch])), 6)
        record(key, res.images_per_second, **extra)
        out.write_text(json.dumps(results, indent=1))  # after each: a run cut short keeps what it measured
    student.unet.load_state_dict(start)
    if args.plain:
        for batch in batches:
            sfx = "" if len(batches) == 1 else f"@b{batch}"
            record("plain_eager_fp32" + sfx, plain_loop(teacher.unet, student.unet, batch, args.steps, device, bf16=False))
            if device.type == "cuda":
                record("plain_eager_bf16" + sfx, plain_loop(teacher.unet, student.unet, batch, args.steps, device, bf16=True))

    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
