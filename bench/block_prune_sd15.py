"""block_prune on the full-size SD-v1.5 UNet (arch preset, random weights, teacher-distance evaluator).

Scores every skippable block at 512² on a latency budget for iPhone 14 Pro, removes the lowest-value blocks
until the budget is met, and saves the value table (JSON) and the ΔQuality-vs-ΔLatency plot.

    python bench/block_prune_sd15.py [--budget-fraction 0.6] [--target iphone-14-pro]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="arch:sd-v1.5")
    ap.add_argument("--budget-fraction", type=float, default=0.6)
    ap.add_argument("--target", default="iphone-14-pro")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[500])
    args = ap.parse_args()

    from snapopt.core import PassContext, PassManager
    from snapopt.devices.registry import TARGETS
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models import load_model
    from snapopt.passes.block_prune import BlockPrune

    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = load_model(args.model, components=["unet", "text_encoder"], seed=0)
    ctx = PassContext(shapes=Shapes(resolution=pipe.resolution, batch=1), targets=[TARGETS.resolve(args.target)], work_dir=RESULTS)
    p = BlockPrune({"budget_fraction": args.budget_fraction, "prompts": 1, "timesteps": args.timesteps})
    out, (rec,) = PassManager([p], ctx, verify=False).run(pipe)
    s = rec.stats
    print(f"{args.model} on {s['target']}: {s['baseline_ms']} ms -> {s['final_ms']} ms (budget {s['budget_ms']} ms)")
    print(f"removed {len(s['removed'])} blocks: {', '.join(s['removed'])}")
    print(f"teacher distance {s['final_quality']:.4f}; {s['evaluations']} evaluations in {rec.seconds:.0f} s")
    name = f"block_prune_{args.model.replace(':', '_')}"
    (RESULTS / f"{name}.json").write_text(json.dumps({
        "stats": s, "evaluations": ctx.report["block_prune"][0]["evaluations"], "seconds_total": time.perf_counter() - t0,
        "params_before": rec.changes["unet"]["params_before"], "params_after": rec.changes["unet"]["params_after"]}, indent=1))
    (RESULTS / "block_prune_value.png").rename(RESULTS / f"{name}.png")
    print(f"saved {RESULTS / (name + '.json')} and {name}.png")


if __name__ == "__main__":
    main()
