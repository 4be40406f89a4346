"""Where a training step's time goes on a small (launch-bound) model: the zoo recovery step split into
data / teacher forward / student forward+backward / optimizer, eager vs cudnn.benchmark vs torch.compile,
plus a torch.profiler table of the trainer's own step (host syncs show up as cudaStreamSynchronize /
cudaMemcpy rows).

    python bench/train_profile.py --teacher zoo:snapshapes --batch 512      # on the GPU
    python bench/train_profile.py --tiny --batch 2 --steps 2                # CPU smoke test

``--graphs``: the chain's fixed-architecture training stages (recover, decoder_distill, step_distill and its
reparametrise warm-up) with the trainer's fast-path defaults, eager vs ``cuda_graphs``, one after the other
in one process, from the same start weights and samples: steady-state seconds per step (the trainer's own
windows after the first 50 steps, which hold warm-up and capture), first-run seconds, peak memory, and how
far the losses of the two runs are apart.

    python bench/train_profile.py --graphs --steps 150                     # on the GPU (about 3 minutes)
    python bench/train_profile.py --graphs --tiny --steps 3                 # CPU smoke test (static path, no capture)
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


#: the chain's training stages (recipes/snapfusion-train.yaml): batch, LR settings and how many of --steps each runs
STAGES = {
    "recover": dict(batch=512, optim=dict(lr=2e-4, schedule="cosine", warmup_steps=100), steps=1.0),
    "decoder_distill": dict(batch=32, optim=dict(lr=3e-4, schedule="cosine", warmup_steps=100), steps=2.0),
    "step_distill": dict(batch=256, optim=dict(lr=1e-5, schedule="cosine", warmup_steps=20), steps=1.0),
    "reparametrise": dict(batch=256, optim=dict(lr=1e-4, schedule="cosine", warmup_steps=20), steps=1.0),
}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _teacher_images(obj, batch: int, cache: dict | None) -> dict:
    """The decoder objective's cache of teacher images, filled for the whole pool before timing and shared
    by both runs. Left to fill itself, every step's new number of misses is a new batch shape for the teacher
    decoder (and cuDNN autotuning), and whichever run came first would pay for that."""
    if cache is None and obj._pool is not None:
        pool = obj.data.pool_x0
        with torch.no_grad(), torch.autocast(pool.device.type, dtype=torch.bfloat16, enabled=pool.device.type == "cuda"):
            for i in range(0, len(pool), batch):
                obj.targets(pool[i:i + batch], pool[i:i + batch] / obj.scale)
        cache = obj._cache
    if cache is not None:
        obj._cache = cache
    return cache


def compare_graphs(args) -> None:
    """Each stage eager, then with cuda_graphs, from the same start weights; see the module docstring."""
    import copy

    from snapopt.core import PassContext
    from snapopt.models import load_model
    from snapopt.passes.channel_prune import ChannelPrune
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer
    from snapopt.train.data import LatentSource
    from snapopt.train.decoder import DecoderObjective
    from snapopt.train.options import DecoderLoss, StepDistillLoss
    from snapopt.train.recover import RecoverObjective
    from snapopt.train.step_distill import ReparamObjective, StepDistillObjective

    ref = "arch:tiny" if args.tiny else args.teacher
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    teacher = load_model(ref, seed=0)
    student = teacher.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": ZOO_BLOCKS if not args.tiny else ["mid_block"]}).run(student, None)
    dec_prog = ChannelPrune({"component": "vae_decoder", "ratio": 0.5, "criterion": "l1"}).run(teacher.clone(["vae_decoder"]), PassContext()).program
    decoder = dec_prog.component("vae_decoder")
    for m in (*teacher.present_modules().values(), student.unet, decoder):
        m.to(device)
    teacher.unet.eval()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    src = "zoo" if ref.startswith("zoo:") else "random"
    pool = args.pool if src == "zoo" else 64
    res = {"device": card, "teacher": ref, "steps": args.steps, "pool": pool, "torch": torch.__version__, "stages": {}}
    print(f"{card}: {ref}, {args.steps} steps per stage", flush=True)
    eps_ref = copy.deepcopy(student.unet).eval()  # the reparametrise warm-up's frozen reference

    def objective(stage: str, o: TrainOptions, data):
        if stage == "recover":
            return RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device, data=data)
        if stage == "decoder_distill":
            return DecoderObjective(teacher, decoder, o, DecoderLoss(multiscale=1.0, val_latents=8), device=device, data=data)
        if stage == "step_distill":
            loss = StepDistillLoss(teacher_steps=16, student_prediction="v_prediction", cfg_probability=0.5, cfg_range=(2.0, 14.0),
                                   original_weight=0.1)
            return StepDistillObjective(teacher, student.unet, o, loss, device=device, data=data)
        return ReparamObjective(teacher, student.unet, o, source_prediction="epsilon", target_prediction="v_prediction",
                                device=device, reference_unet=eps_ref, data=data)

    for stage in [s for s in args.stages.split(",") if s]:
        spec = STAGES[stage]
        steps = max(2, int(args.steps * spec["steps"]))
        batch = args.batch_override or (2 if args.tiny else spec["batch"])
        module = decoder if stage == "decoder_distill" else student.unet
        start = copy.deepcopy(module.state_dict())
        runs = {}
        data = cache = None
        for mode in ("eager", "cuda_graphs"):
            module.load_state_dict(start)
            optim = {**spec["optim"], "warmup_steps": min(spec["optim"]["warmup_steps"], steps)}
            o = TrainOptions(steps=steps, batch=batch, ema=0.999, progress=False, device=str(device), optim=optim,
                             data=dict(source=src, pool=pool, cond_dropout=0.0 if stage == "decoder_distill" else 0.1),
                             cuda_graphs=mode == "cuda_graphs")
            obj = objective(stage, o, data)
            data = obj.data  # the second run draws from the same pool (and reuses its encoding)
            if stage == "decoder_distill":
                cache = _teacher_images(obj, batch, cache if mode != "eager" else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                r = Trainer(obj, o, None, device=device, title=f"{stage} {mode}").run()
            except Exception as exc:  # noqa: BLE001 - a bench reports what failed and goes on
                import traceback

                runs[mode] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}", "traceback": traceback.format_exc()[-3000:]}
                print(f"{stage:16s} {mode:12s} FAILED {runs[mode]['error']}\n{runs[mode]['traceback']}", flush=True)
                continue
            finally:
                if hasattr(obj, "close"):
                    obj.close()
            wall = time.perf_counter() - t0
            steady = [row["seconds"] for row in r.history if row["step"] > 50] or [row["seconds"] for row in r.history[1:]]
            runs[mode] = {"wall_s": round(wall, 2), "step_s": sum(steady) / max(len(steady), 1), "images_per_s": r.images_per_second,
                          "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
                          "losses": [row["loss"] for row in r.history], "extra": r.extra}
            print(f"{stage:16s} {mode:12s} {runs[mode]['step_s'] * 1e3:8.1f} ms/step  wall {wall:6.1f} s  "
                  f"loss {r.history[0]['loss']:.4g} -> {r.history[-1]['loss']:.4g}", flush=True)
        out = {"steps": steps, "batch": batch, **runs}
        if all("losses" in runs.get(m, {}) for m in ("eager", "cuda_graphs")):
            a, b = runs["cuda_graphs"]["losses"], runs["eager"]["losses"]
            k = min(20, len(a))
            tail = max(1, len(a) // 10)
            out["speedup"] = round(runs["eager"]["step_s"] / runs["cuda_graphs"]["step_s"], 3)
            out["loss_max_rel_diff_first_steps"] = max(_rel(x, y) for x, y in zip(a[:k], b[:k]))
            out["loss_first_steps_compared"] = k
            out["loss_rel_diff_last_tenth_mean"] = _rel(sum(a[-tail:]) / tail, sum(b[-tail:]) / tail)
            print(f"{stage:16s} speed-up {out['speedup']:.2f}x; losses: max rel diff {out['loss_max_rel_diff_first_steps']:.2e} "
                  f"over the first {k} steps, {out['loss_rel_diff_last_tenth_mean']:.2e} in the last tenth's mean", flush=True)
        res["stages"][stage] = out
    tag = card.replace("NVIDIA ", "").split()[0].lower() if device.type == "cuda" else "cpu"
    path = args.out or ROOT / "bench" / "results" / f"train_graphs_{ref.replace(':', '_')}_{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="zoo:snapshapes")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", default="default,reduce-overhead", help="torch.compile modes to try ('' for none)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--graphs", action="store_true", help="the training stages eager vs cuda_graphs (see the docstring)")
    ap.add_argument("--stages", default=",".join(STAGES), help="--graphs: which stages")
    ap.add_argument("--pool", type=int, default=2048, help="--graphs: zoo latent pool")
    ap.add_argument("--batch-override", type=int, default=0, help="--graphs: one batch for every stage (0: the recipe's)")
    args = ap.parse_args()
    if args.graphs:
        return compare_graphs(args)

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
