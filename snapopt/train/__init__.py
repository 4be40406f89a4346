"""Distillation-in-the-loop training: recovery (BK-SDM / SnapGen), robust training and step and decoder
distillation (SnapFusion), on one CPU, one GPU or several through torchrun + DDP. See docs/training.md."""

from snapopt.train.jobs import DecoderJob, RecoverJob, StepDistillJob, run_decoder, run_recover, run_step_distill
from snapopt.train.options import (DataOptions, DecoderLoss, OptimOptions, RecoverLoss, RobustOptions, StepDistillLoss,
                                   TrainOptions)
from snapopt.train.trainer import Trainer, TrainResult

__all__ = ["DataOptions", "DecoderJob", "DecoderLoss", "OptimOptions", "RecoverJob", "RecoverLoss", "RobustOptions",
           "StepDistillJob", "StepDistillLoss", "TrainOptions", "TrainResult", "Trainer", "run_decoder", "run_recover",
           "run_step_distill"]
