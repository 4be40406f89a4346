"""How much sampling a split-einsum model with sdpa saves in `snapopt eval` and every zoo evaluation.

A run's output ships Apple's split-einsum attention (for the Neural Engine). The evaluation samples it with
torch's fused attention instead (:func:`snapopt.models.attention.sampling_attention`, exact). This times
generate() on zoo:snapshapes rewritten to split-einsum, with and without that swap, alternating in one process.

    python bench/eval_sampling_attention.py [--prompts 16 --steps 8 --repeats 3]   # -> bench/results/eval_sampling_attention_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    import snapopt.models.attention as attention
    from snapopt.zoo import shapes, zoo_path
    from snapopt.zoo.evaluate import generate

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "eval_sampling_attention_cpu.json")
    args = ap.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(zoo_path("zoo:snapshapes"))
    attention.set_attention(pipe.unet, "split_einsum")
    captions = shapes.heldout_prompts(args.prompts).captions()
    swap = attention.sampling_attention

    seconds = {"split_einsum": [], "sdpa_for_sampling": []}
    images = {}
    for _ in range(args.repeats):
        for name, cm in (("split_einsum", lambda root: contextlib.nullcontext(0)), ("sdpa_for_sampling", swap)):
            attention.sampling_attention = cm  # generate() imports it at call time
            t0 = time.perf_counter()
            images[name] = generate(pipe, captions, steps=args.steps, cfg=7.5, seed=0)
            seconds[name].append(round(time.perf_counter() - t0, 3))
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    attention.sampling_attention = swap
    med = {k: statistics.median(v) for k, v in seconds.items()}
    out = {"command": "python bench/eval_sampling_attention.py", "device": "cpu", "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "prompts": args.prompts, "steps": args.steps,
           "seconds": seconds, "median_seconds": med, "speedup": round(med["split_einsum"] / med["sdpa_for_sampling"], 3),
           "max_abs_image_difference": float((images["split_einsum"] - images["sdpa_for_sampling"]).abs().max())}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"median {med['split_einsum']:.2f} s split-einsum vs {med['sdpa_for_sampling']:.2f} s with sdpa for sampling: "
          f"{out['speedup']}x; images differ by at most {out['max_abs_image_difference']:.2e}. Wrote {args.json}")


if __name__ == "__main__":
    main()
