"""The evaluators' ceiling: real snapshapes renders of the held-out prompts scored like a model's samples.

A generated image can at best look like a fresh render of its prompt. This scores renders (other seeds than the FID
reference renders) with the same FID / CLIP / attribute code as every evaluation, so docs can say how far the
teacher is from the data it learnt.

    python bench/zoo_real_render_scores.py [--prompts 64 --seeds 101,102]   # -> bench/results/zoo_real_render_scores.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from snapopt.zoo import shapes
    from snapopt.zoo.evaluate import score_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seeds", default="101,102", help="render seeds (the FID reference uses 7-10 at sampling seed 0)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "zoo_real_render_scores.json")
    args = ap.parse_args()
    scenes = shapes.heldout_prompts(args.prompts)
    rows = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        rows[f"render_seed_{seed}"] = {k: round(v, 4) for k, v in score_images(shapes.render(scenes, seed), scenes).items()}
        r = rows[f"render_seed_{seed}"]
        print(f"renders, seed {seed}: FID {r['fid']:.2f} / CLIP {r['clip_score']:.2f} / attributes {100 * r['attribute_accuracy']:.1f}%")
    out = {"command": "python bench/zoo_real_render_scores.py", "prompts": args.prompts, "rows": rows}
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
