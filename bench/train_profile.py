"""Where a training step's time goes on a small (launch-bound) model: the zoo recovery step split into
data / teacher forward / student forward+backward / optimizer, eager vs cudnn.benchmark vs torch.compile,
plus a torch.profiler table of the trainer's own step (host syncs show up as cudaStreamSynchronize /
cudaMemcpy rows).

    python bench/train_profile.py --teacher zoo:snapshapes --batch 512      # on the GPU
    python bench/train_profile.py --tiny --batch 2 --steps 2                # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ZOO_BLOCKS = ["down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.1.resnets.1", "down_blocks.1.attentions.1",
              "down_blocks.2.resnets.1", "down_blocks.2.attentions.1", "down_blocks.3.resnets.1", "up_blocks.0.resnets.1",
              "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.resnets.1", "up_blocks.2.attentions.1",
              "up_blocks.3.resnets.1", "up_blocks.3.attentions.1", "mid_block"]


def timed(fn, steps: int, device) -> float:
    """Median seconds of ``fn()`` after one warm-up call, synchronising around each call."""
    fn()
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="zoo:snapshapes")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", default="default,reduce-overhead", help="torch.compile modes to try ('' for none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.recover import RecoverObjective

    ref = "arch:tiny" if args.tiny else args.teacher
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    teacher = load_model(ref, seed=0)
    student = teacher.clone(["unet"])
    if not args.tiny:
        RemoveBlocks({"component": "unet", "blocks": ZOO_BLOCKS}).run(student, None)
    for m in (*teacher.present_modules().values(), student.unet):
        m.to(device)
    teacher.unet.eval()
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "teacher": ref, "batch": args.batch, "parts_s": {}}
    src = "zoo" if ref.startswith("zoo:") else "random"
    o = TrainOptions(steps=args.steps + 2, batch=args.batch, progress=False, ema=0.999, device=str(device), optim=dict(lr=1e-5),
                     data=dict(source=src, pool=1024))
    obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    b = obj.data.batch(0, args.batch)
    x_t = obj.sched.add_noise(b.x0, b.noise, b.t)
    t = b.t.to(device)
    opt = torch.optim.AdamW(student.unet.parameters(), lr=1e-5)

    def teacher_fwd(unet=teacher.unet):
        with torch.no_grad(), cast:
            return unet(x_t, t, b.cond, return_dict=False)[0]

    def student_fb(unet=student.unet):
        with cast:
            out = unet(x_t, t, b.cond, return_dict=False)[0]
        out.float().pow(2).mean().backward()

    parts = res["parts_s"]
    parts["data_batch"] = timed(lambda: obj.data.batch(1, args.batch), args.steps, device)
    parts["add_noise"] = timed(lambda: obj.sched.add_noise(b.x0, b.noise, b.t), args.steps, device)
    parts["teacher_fwd"] = timed(teacher_fwd, args.steps, device)
    parts["student_fwd_bwd"] = timed(student_fb, args.steps, device)
    parts["adamw_foreach"] = timed(lambda: opt.step(), args.steps, device)
    if device.type == "cuda":
        fused = torch.optim.AdamW(student.unet.parameters(), lr=1e-5, fused=True)
        parts["adamw_fused"] = timed(lambda: fused.step(), args.steps, device)
        torch.backends.cudnn.benchmark = True
        parts["teacher_fwd_cudnn_bench"] = timed(teacher_fwd, args.steps, device)
        parts["student_fwd_bwd_cudnn_bench"] = timed(student_fb, args.steps, device)
    obj.close()
    for mode in [m for m in args.compile.split(",") if m]:
        torch._dynamo.reset()
        try:
            ct = torch.compile(teacher.unet, mode=mode)
            cs = torch.compile(student.unet, mode=mode)
            t0 = time.perf_counter()
            teacher_fwd(ct), student_fb(cs)
            parts[f"compile_time_{mode}"] = time.perf_counter() - t0
            parts[f"teacher_fwd_compiled_{mode}"] = timed(lambda: teacher_fwd(ct), args.steps, device)
            parts[f"student_fwd_bwd_compiled_{mode}"] = timed(lambda: student_fb(cs), args.steps, device)
        except Exception as exc:  # noqa: BLE001 - a bench reports what failed and goes on
            parts[f"compile_{mode}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for k, v in parts.items():
        print(f"{k:40s} {v * 1e3:9.2f} ms" if isinstance(v, float) else f"{k:40s} {v}", flush=True)

    # the trainer's own step under the profiler
    torch._dynamo.reset()
    obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        r = Trainer(obj, o, None, device=device).run()
    obj.close()
    res["trainer_images_per_s"] = r.images_per_second
    res["trainer_seconds"] = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    print(table)
    res["profile_top"] = table
    out = args.out or ROOT / "bench" / "results" / f"train_profile_{ref.replace(':', '_')}_b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"trainer {r.images_per_second:.1f} img/s; wrote {out}")


if __name__ == "__main__":
    main()
