"""Step distillation's trajectory pools prepared by the trainer before its clock starts, against built lazily on the
first step (the old way): same losses and weights bit for bit, and the trainer's seconds without the pools.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python bench/trajectory_prepare_check.py     # on the GPU (about 30 s)
    python bench/trajectory_prepare_check.py --model arch:tiny --steps 2 --pool 8  # CPU smoke test

On the GPU both runs train with ``cuda_graphs`` and deterministic kernels, as recipes/snapfusion-train.yaml does.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:snapshapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pool", type=int, default=1024, help="trajectories per kind (guided, plain)")
    args = ap.parse_args(argv)

    from snapopt.models.loading import load_model
    from snapopt.train import Trainer
    from snapopt.train.options import StepDistillLoss, TrainOptions
    from snapopt.train.step_distill import StepDistillObjective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    pipe = load_model(args.model)
    for m in pipe.present_modules().values():
        m.to(device).eval()
    source = {"source": "zoo", "pool": args.pool} if args.model.startswith("zoo:") else {"source": "random"}
    train = TrainOptions(steps=args.steps, batch=128 if gpu else 4, progress=False, cuda_graphs=gpu, deterministic=gpu,
                         ema=0.999, optim={"lr": 1e-4}, data=source)
    teacher_steps = 48 if gpu else 16
    lo = StepDistillLoss(teacher_steps=teacher_steps, student_steps=8, trajectory_probability=1.0,
                         trajectory_pool=args.pool, cfg_probability=0.5)
    runs = {}
    for name in ("prepared", "lazy"):
        student = copy.deepcopy(pipe.unet)
        obj = StepDistillObjective(pipe, student, train, lo, device=device)
        if name == "lazy":
            obj.prepare = lambda: None  # the pools then come with the first step's draw
        t0 = time.perf_counter()
        res = Trainer(obj, train, None, device=device).run()
        if gpu:
            torch.cuda.synchronize()
        runs[name] = {"losses": [h["loss"] for h in res.history], "weights": {k: v.detach().clone() for k, v in student.state_dict().items()},
                      "trainer_seconds": round(res.seconds, 2), "wall_seconds": round(time.perf_counter() - t0, 2)}
    a, b = runs["prepared"], runs["lazy"]
    out = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "steps": args.steps, "pool": args.pool,
           "losses_equal": a["losses"] == b["losses"], "weights_equal": all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]),
           **{f"{k}_{n}": runs[n][k] for n in runs for k in ("trainer_seconds", "wall_seconds")}}
    print(out)
    return out


if __name__ == "__main__":
    main()
