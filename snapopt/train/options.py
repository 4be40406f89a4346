"""Typed options of every training job (pydantic; unknown keys are errors, like pass options).

One ``TrainOptions`` drives the loop (optimizer, schedule, precision, checkpoints); each objective adds its
own loss options. Everything a run depends on is here, so a resumed run can check it was given the same.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimOptions(_Opts):
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm (0: off)")
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to this fraction of lr")


class DataOptions(_Opts):
    """Where x_0 latents and prompts come from. No image dataset is needed:

    * ``random``: x_0 ~ N(0, 1) latents with embeddings of the prompts (what a UNet sees at high t anyway)
    * ``teacher``: a pool of x_0 sampled by the teacher (DDIM, CFG) from the prompts
    * ``zoo``: the zoo's procedural snapshapes scenes, rendered and encoded with the teacher's VAE
    * ``student``: a pool of x_0 sampled by the model being optimised (its UNet as it enters the pass), decoder
      distillation only: placed after step distillation, the decoder learns the very latents the shipped pipeline decodes
    """

    source: Literal["random", "teacher", "zoo", "student"] = "random"
    prompts: list[str] = Field(default_factory=list, description="prompts (default: see prompt_set; the zoo source uses its scenes' captions)")
    prompt_set: Literal["auto", "validation"] = Field(
        "auto", description="prompts of the teacher, student and random sources when `prompts` is empty. auto: captions of the model's own "
                            "training distribution where known (zoo:snapshapes: its training split), else "
                            "snapopt.quality.VALIDATION_PROMPTS; validation: always those")
    pool: int = Field(64, ge=1, description="latents precomputed for the teacher, student and zoo sources")
    teacher_steps: int = Field(20, ge=1, description="DDIM steps the pool is sampled with (teacher and student sources)")
    teacher_cfg: float = Field(7.5, ge=1, description="guidance scale the pool is sampled with (teacher and student sources)")
    cond_dropout: float = Field(0.0, ge=0, le=1, description="replace the prompt by the empty prompt (keeps CFG working)")
    fixed_batch: bool = Field(False, description="the same batch every step (debugging, overfit tests)")


class CompileOptions(_Opts):
    """torch.compile of the training forwards (snapopt.train.accel). Off unless the spec names it."""

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="reduce-overhead adds CUDA graphs (static shapes): what launch-bound small models need")
    backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"] = Field(
        "inductor", description="cudagraphs: CUDA graphs without Inductor's code generation (seconds to compile, not minutes)")
    student: bool = Field(True, description="compile the student's forward (+ backward)")
    teacher: bool = Field(True, description="compile the teacher's forward")
    dynamic: bool | None = Field(False, description="torch.compile's dynamic; False: one graph per input shape")
    fullgraph: bool = False


class TrainOptions(_Opts):
    steps: int = Field(100, ge=1)
    batch: int = Field(4, ge=1, description="global batch (split over ranks)")
    seed: int = 0
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, off on CPU")
    gradient_checkpointing: bool = False
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of the student's weights (0: off); warms up as min(ema, (1+step)/(10+step))")
    use_ema: bool = Field(True, description="hand the EMA weights back at the end, when ema > 0")
    optim: OptimOptions = OptimOptions()
    data: DataOptions = DataOptions()
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    shard_mb: float = Field(15.0, gt=0, description="largest safetensors piece, MB")
    log_every: int = Field(1, ge=1)
    progress: bool = True
    find_unused_parameters: bool | None = Field(None, description="DDP; default: on when blocks are skipped at random")
    # -- speed (snapopt.train.accel): none of these changes what is trained, only how fast ----------------
    compile: CompileOptions | None = Field(None, description="torch.compile the forwards (off when absent)")
    fused_optimizer: bool | None = Field(None, description="AdamW(fused=True): one kernel for the whole step; default: on CUDA")
    teacher_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: a bf16 copy of the teacher when training under bf16 autocast (the cast autocast "
                            "would make every forward, made once); the pipeline's own teacher is never changed")
    channels_last: bool = Field(False, description="channels-last memory format for student and teacher (convolution-heavy UNets)")
    cudnn_benchmark: bool | None = Field(None, description="let cuDNN time its convolution algorithms; default: on CUDA unless deterministic")
    deterministic: bool = Field(False, description="toward the same weights from two CUDA runs: deterministic kernels "
                                                   "(torch.use_deterministic_algorithms; an op without one only warns), cuDNN "
                                                   "autotuning off (it picks kernels by timing); export CUBLAS_WORKSPACE_CONFIG=:4096:8 "
                                                   "before the run for cuBLAS. Process-wide: later stages keep it. Slower; CPU runs "
                                                   "are reproducible without it")
    cuda_graphs: bool | None = Field(None, description="capture the whole training step (forward, backward, optimizer) as one "
                                                       "CUDA graph and replay it: no per-kernel host launches, no compilation; "
                                                       "needs static shapes (recover, decoder_distill, step_distill, reparametrise); "
                                                       "robust training's random block skipping is captured as per-step gates (same "
                                                       "training as eager); refused with torchrun, gradient_checkpointing, compile; "
                                                       "on CPU the same step runs uncaptured; default: off")
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="scaled_dot_product_attention's kernel: auto (torch's choice) or one backend first, the math "
                            "kernel staying as the fallback for shapes it refuses (CUDA; SD-scale attention at 4096 tokens "
                            "with 40-wide heads is where the choice shows)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp (replicated) or fsdp (FSDP2 fully_shard "
                                                                 "per UNet block: parameters, gradients and optimizer state sharded)")

    @model_validator(mode="after")
    def _check(self):
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) exceeds steps ({self.steps})")
        if self.deterministic and self.cudnn_benchmark:
            raise ValueError("deterministic: true needs cudnn_benchmark off (cuDNN's autotuning picks kernels by timing)")
        return self


class RobustOptions(_Opts):
    """SnapFusion's robust training: skip cross-attention / ResNet blocks at random, per step."""

    attention: float = Field(0.0, ge=0, le=1, description="probability of skipping each attention block")
    resnet: float = Field(0.0, ge=0, le=1, description="probability of skipping each channel-preserving ResNet")
    blocks: list[str] = Field(default_factory=list, description="restrict to these blocks (default: every skippable one)")

    @property
    def enabled(self) -> bool:
        return self.attention > 0 or self.resnet > 0


class RecoverLoss(_Opts):
    """BK-SDM's loss: task + output KD + feature KD (all weights 1 in the paper)."""

    task: float = Field(1.0, ge=0, description="weight of the denoising loss (noise or v, per the scheduler)")
    output_kd: float = Field(1.0, ge=0, description="weight of student-vs-teacher UNet output MSE")
    feature_kd: float = Field(1.0, ge=0, description="weight of the stage-output feature MSE (summed over stages)")
    stages: list[str] = Field(default_factory=list, description="stages to match (default: every down/mid/up stage both have)")
    timestep_scaling: bool = Field(False, description="SnapGen: rescale KD terms per sample to the task loss's magnitude at that t")
    guidance_kd: float = Field(0.0, ge=0, description="weight of the guidance-direction KD: |(c_s - u_s) - (c_t - u_t)|^2, the "
                                                      "conditional minus the empty-prompt output of student and teacher, which "
                                                      "classifier-free guidance multiplies by its scale (0: off)")
    guidance_fraction: float = Field(0.25, gt=0, le=1, description="share of the batch also run with the empty prompt for "
                                                                   "guidance_kd (extra forward work: this fraction of the batch)")

    @model_validator(mode="after")
    def _some(self):
        if self.task + self.output_kd + self.feature_kd + self.guidance_kd == 0:
            raise ValueError("all loss weights are 0")
        return self


class StepDistillLoss(_Opts):
    teacher_steps: int = Field(16, ge=2, description="the teacher's step count N; the student learns N/2 (or student_steps)")
    student_steps: int | None = Field(
        None, ge=1, description="the student's step count (default N/2). Fewer: each student step learns N/student_steps teacher "
                                "steps at once, i.e. direct distillation from a finer solve of the teacher's ODE (32 -> 8: the "
                                "16-step teacher's own few-step error, which an N -> N/2 student inherits, shrinks)")
    cfg_probability: float = Field(0.0, ge=0, le=1, description="CFG-aware distillation with this probability per step")
    cfg_range: tuple[float, float] = Field((2.0, 14.0), description="guidance scale drawn uniformly from this range")
    original_weight: float = Field(0.0, ge=0, description="weight of the plain denoising loss mixed in")
    cfg_normalise: bool = Field(False, description="divide a CFG-aware sample's error by w^2: the guided output's error grows "
                                                    "with w, so without it the largest scales drown out the rest")
    weighting: Literal["snr_trunc", "output"] = Field(
        "snr_trunc", description="snr_trunc: x_0 error weighted by max(SNR, 1) (progressive distillation); "
                                 "output: plain MSE in the model's prediction space (under-weights the noisy steps that set the trajectory)")

    student_prediction: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="what the student's UNet outputs (default: what it outputs as it enters). v_prediction: SnapFusion's "
                          "student, x_hat = alpha_t z_t - sigma_t v_hat; a student entering as epsilon is first re-expressed "
                          "by the job's `reparametrise` warm-up, and the pipeline leaves with prediction_type v_prediction")
    grid: Literal["ddim", "halved"] = Field(
        "ddim", description="the student's timesteps. ddim: diffusers' N/2-step DDIM grid (what a plain DDIMScheduler samples). "
                            "halved: the N/4-step DDIM grid with every step split in two, i.e. exactly the path that a later "
                            "N/2 -> N/4 distillation walks its teacher on (SnapFusion's 16-step teacher for a 16 -> 8 student)")
    trajectory_probability: float = Field(
        0.0, ge=0, le=1, description="probability per step of training on states of the teacher's own sampling trajectories "
                                     "(from pure noise, guided at the step's kind of scale) instead of noised data: the states the "
                                     "sampler visits, where the student's single step will be used; the target is the trajectory's "
                                     "next state, so these steps need no teacher forward")
    trajectory_pool: int = Field(4096, ge=1, description="teacher trajectories precomputed per kind (guided, plain)")

    @model_validator(mode="after")
    def _check(self):
        if self.grid == "halved" and self.teacher_steps % 4:
            raise ValueError(f"grid: halved needs teacher_steps divisible by 4, got {self.teacher_steps}")
        if self.student_steps is None and self.teacher_steps % 2:
            raise ValueError(f"teacher_steps must be even, got {self.teacher_steps}")
        if self.student_steps is not None:
            if self.student_steps >= self.teacher_steps or self.teacher_steps % self.student_steps:
                raise ValueError(f"student_steps must divide teacher_steps and be fewer, got {self.student_steps} for {self.teacher_steps}")
            if self.grid == "halved" and self.student_steps != self.teacher_steps // 2:
                raise ValueError(f"grid: halved trains an N -> N/2 student; student_steps must be {self.teacher_steps // 2} or unset")
        lo, hi = self.cfg_range
        if not 1 <= lo <= hi:
            raise ValueError(f"cfg_range must satisfy 1 <= low <= high, got {list(self.cfg_range)}")
        return self


def student_step_count(loss: StepDistillLoss) -> int:
    """The student's steps: ``loss.student_steps``, else half the teacher's."""
    return loss.student_steps or loss.teacher_steps // 2


class StepDistillStage(_Opts):
    """One step-distillation stage run inside another (SnapFusion's teacher, itself step-distilled 32 -> 16
    before the student is distilled 16 -> 8 from it): a copy of the teacher's UNet is trained, the program
    is not touched."""

    train: TrainOptions = TrainOptions()
    loss: StepDistillLoss = StepDistillLoss(teacher_steps=32, grid="halved")
    reparametrise: TrainOptions | None = Field(None, description="the warm-up that switches the output parametrisation, "
                                                                 "when loss.student_prediction differs from the teacher's")


class DecoderLoss(_Opts):
    mse: float = Field(1.0, ge=0)
    multiscale: float = Field(0.0, ge=0, description="MSE of 2x and 4x average-pooled images (a cheap perceptual-ish term)")
    edges: float = Field(0.0, ge=0, description="MSE of the images' horizontal and vertical pixel differences: weights the "
                                                "outlines and thin shapes a per-pixel MSE averages away")
    val_latents: int = Field(8, ge=1, description="held-out latents for PSNR before/after")
