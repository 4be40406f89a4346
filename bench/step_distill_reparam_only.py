"""Does the epsilon -> v re-expression warm-up alone change what the zoo teacher draws? (issue 11)

SnapFusion's student predicts v; the embedded teacher predicts epsilon. ``step_distill``'s ``reparametrise``
warm-up trains a copy on its frozen self's output converted to v. This bench runs only that warm-up on
zoo:snapshapes and scores the v copy at 50 / 16 / 8 steps on the 64 held-out prompts, with how far its own
samples moved (same noise, CFG 7.5), so the cost of the switch is seen apart from any distillation.

    python bench/step_distill_reparam_only.py --out bench/results/step_distill_reparam_only_h200.json --steps 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--steps", type=int, default=1000, help="warm-up steps (the recipe variant's reparametrise.steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from snapopt.models.loading import load_model
    from snapopt.train.evaluation import sample_distance, zoo_metrics
    from snapopt.train.options import TrainOptions
    from snapopt.train.step_distill import ReparamObjective, set_prediction_type
    from snapopt.train.trainer import Trainer

    dev = torch.device(args.device)
    t0 = time.time()
    teacher = load_model("zoo:snapshapes")
    for m in teacher.present_modules().values():
        m.to(dev).eval()
    opts = TrainOptions(steps=args.steps, batch=256, ema=0.999, progress=True, device=args.device,
                        optim=dict(lr=2e-4, schedule="cosine", warmup_steps=50),
                        data=dict(source="zoo", pool=8192, cond_dropout=0.1))
    v = replace(teacher, unet=copy.deepcopy(teacher.unet), extra=dict(teacher.extra))
    objective = ReparamObjective(teacher, v.unet, opts, source_prediction="epsilon", target_prediction="v_prediction",
                                 device=dev, reference_unet=teacher.unet)
    res = Trainer(objective, opts, None, device=dev).run()
    v.unet.eval()
    set_prediction_type(v, "v_prediction")
    out = {"command": f"python bench/step_distill_reparam_only.py --out OUT.json --steps {args.steps}",
           "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "reparametrise": opts.model_dump(mode="json"), "train_seconds": round(res.seconds, 1),
           "loss_first": res.history[0]["loss"], "loss_last": res.final["loss"]}
    kw = dict(prompts=32, cfg=7.5, seed=0, device=dev)
    out["sample_change"] = {n: sample_distance(teacher, v, n, n, **kw) for n in (8, 16, 50)}
    out["zoo"] = {}
    for n in (50, 16, 8):
        out["zoo"][f"v_{n}"] = zoo_metrics(v, 64, n, 7.5, 0)
        print(n, out["zoo"][f"v_{n}"], flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
