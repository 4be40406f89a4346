"""The teacher's DDIM sampler eager vs recorded as CUDA graphs (``sample_latents(graphs=...)``), on the chain's own
sampling jobs: the decoder's teacher latent pool (25 guided steps, 128 prompts per call, fp32) and step
distillation's sample distances (48 teacher steps and 8 student steps, 32 prompts) and its guided trajectory pool
(bf16 teacher copy under autocast, as training builds it). Each configuration runs
eager, then graphed, then eager again (the first run of a shape pays cuDNN's and the allocator's warm-up), from
the same noise and prompts; it reports the seconds of the later eager run and of the graphed one, and whether
their latents are equal bit for bit.

    python bench/sampler_graphs.py --json bench/results/sampler_graphs_<card>.json      # on the GPU (about a minute)
    python bench/sampler_graphs.py --model arch:tiny --prompts 8 --steps 2 --trajectories 4  # CPU smoke test (static path, no capture)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_sample(pipe, cond, uncond, *, graphs: bool, device, **kw) -> tuple[float, torch.Tensor]:
    from snapopt.train.sampling import sample_latents

    _sync(device)
    t0 = time.perf_counter()
    out = sample_latents(pipe, cond, uncond, graphs=graphs, device=device, **kw)
    _sync(device)
    return time.perf_counter() - t0, out


def trajectory_row(pipe, device, n: int, steps: int | None) -> dict:
    """Step distillation's guided trajectory pool (48 -> 8 on the teacher's solve, 512 trajectories per walk), built
    eager and graphed under the trainer's bf16 autocast with its bf16 teacher copy, as a chain's first draw builds it."""
    from snapopt.train.options import StepDistillLoss, TrainOptions
    from snapopt.train.step_distill import StepDistillObjective
    from snapopt.train.trainer import autocast_for
    from snapopt.train.trajectories import TrajectoryPool

    teacher_steps = steps * 8 if steps else 48
    train = TrainOptions(steps=1, batch=2, progress=False, data={"source": "random"})
    obj = StepDistillObjective(pipe, pipe.unet, train, StepDistillLoss(teacher_steps=teacher_steps, student_steps=8,
                               trajectory_pool=n), device=device)
    times, pools = {}, {}
    for name, graphs in (("eager_first", False), ("graphed", True), ("eager", False)):
        _sync(device)
        t0 = time.perf_counter()
        with autocast_for(device, train.mixed_precision):
            pools[name] = TrajectoryPool(obj, n, guided=True, seed=7919, graphs=graphs)
        _sync(device)
        times[name] = time.perf_counter() - t0
    e, g = pools["eager"].states, pools["graphed"].states
    row = {"prompts": n, "steps": teacher_steps, "batch": 512, "eager_first_s": round(times["eager_first"], 3),
           "eager_s": round(times["eager"], 3), "graphed_s": round(times["graphed"], 3),
           "speedup": round(times["eager"] / times["graphed"], 2), "bit_equal": bool(torch.equal(e, g)),
           "max_abs_diff": float((e - g).abs().max())}
    print(f"{'trajectory_pool_guided':24s} {n:5d} trajectories x {teacher_steps} teacher steps: eager {times['eager']:7.2f} s, "
          f"graphed {times['graphed']:7.2f} s, {row['speedup']:.2f}x, bit-equal {row['bit_equal']}")
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes", help="model reference (arch:tiny for a CPU smoke test)")
    ap.add_argument("--prompts", type=int, default=512, help="prompts of the pool configuration (the recipe's pool is 4096)")
    ap.add_argument("--steps", type=int, default=None, help="override every configuration's step count (smoke tests)")
    ap.add_argument("--trajectories", type=int, default=1024,
                    help="trajectories of the guided trajectory-pool configuration (the recipe's pool: 4096; 0: skip)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from snapopt.models.loading import load_model
    from snapopt.train.data import embed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_model(args.model)
    for m in pipe.present_modules().values():
        m.to(device).eval()
    shape = (pipe.unet.config.in_channels, pipe.latent_size, pipe.latent_size)
    configs = {  # name: (prompts, steps, prompts per UNet call)
        "decoder_teacher_pool": (args.prompts, 25, 128),
        "distance_teacher_48": (32, 48, 128),
        "distance_student_8": (32, 8, 128),
    }
    prompts = [f"a small red circle at the left on a white background {i}" for i in range(max(c[0] for c in configs.values()))]
    cond_all = embed(pipe, prompts, device)
    uncond = embed(pipe, [""], device, 1)[0]
    rows = {}
    for name, (n, steps, batch) in configs.items():
        steps = args.steps or steps
        kw = dict(steps=steps, cfg=7.5, shape=shape, seed=0, batch=batch)
        cond = cond_all[:n]
        first, _ = timed_sample(pipe, cond, uncond, graphs=False, device=device, **kw)
        graphed, g_out = timed_sample(pipe, cond, uncond, graphs=True, device=device, **kw)
        eager, e_out = timed_sample(pipe, cond, uncond, graphs=False, device=device, **kw)
        rows[name] = {"prompts": n, "steps": steps, "batch": batch, "eager_first_s": round(first, 3), "eager_s": round(eager, 3),
                      "graphed_s": round(graphed, 3), "speedup": round(eager / graphed, 2), "bit_equal": bool(torch.equal(e_out, g_out)),
                      "max_abs_diff": float((e_out - g_out).abs().max())}
        print(f"{name:24s} {n:5d} prompts x {steps:2d} steps: eager {eager:7.2f} s (first {first:.2f} s), graphed {graphed:7.2f} s, "
              f"{eager / graphed:.2f}x, bit-equal {rows[name]['bit_equal']}")
    if args.trajectories:
        rows["trajectory_pool_guided"] = trajectory_row(pipe, device, args.trajectories, args.steps)
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "model": args.model,
           "dtype": str(next(pipe.unet.parameters()).dtype), "torch": torch.__version__,
           "deterministic": torch.are_deterministic_algorithms_enabled(), "configs": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
