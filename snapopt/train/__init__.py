"""Distillation-in-the-loop training: recovery (BK-SDM / SnapGen), robust training and step and decoder
distillation (SnapFusion), on one CPU, one GPU or several through torchrun + DDP. See docs/training.md.

Names are imported on first use (PEP 562), so ``snapopt train --help`` and its usage errors need no torch."""

from importlib import import_module

_WHERE = {"DecoderJob": "jobs", "RecoverJob": "jobs", "StepDistillJob": "jobs", "run_decoder": "jobs", "run_recover": "jobs",
          "run_step_distill": "jobs", "DataOptions": "options", "DecoderLoss": "options", "OptimOptions": "options",
          "RecoverLoss": "options", "RobustOptions": "options", "StepDistillLoss": "options", "StepDistillStage": "options", "TrainOptions": "options",
          "Trainer": "trainer", "TrainResult": "trainer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f"snapopt.train.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'snapopt.train' has no attribute {name!r}")
