"""A training job spec (YAML/JSON): model, the structural passes that make the student, the job and
its options. Validated whole before anything runs; errors are one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapopt.errors import UsageError

JOBS = {"recover": "RecoverJob", "decoder_distill": "DecoderJob", "step_distill": "StepDistillJob"}


class PassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pass_: str = Field(alias="pass")
    options: dict[str, Any] = Field(default_factory=dict)


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="teacher: arch:<preset>, zoo:<name>, a folder or hub id")
    resolution: int | None = None
    student: str | None = Field(None, description="the model the student starts from (a saved model folder, zoo:<name>, ...; "
                                "default: the teacher); the spec's passes then apply to it. For training a stage on the "
                                "output of another job (a recovered UNet, step-distilled here) without replaying it")
    passes: list[PassSpec] = Field(default_factory=list, description="structural passes that turn the teacher (or the student) into the student")
    job: Literal["recover", "decoder_distill", "step_distill"]
    options: dict[str, Any] = Field(default_factory=dict)
    save_model: bool = True

    def job_options(self):
        from snapopt.train import jobs

        cls = getattr(jobs, JOBS[self.job])
        try:
            return cls(**self.options)
        except ValidationError as exc:
            raise UsageError(f"options.{_first(exc)}") from None


def _first(exc: ValidationError) -> str:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    return f"{loc}: {e['msg']}" if loc else e["msg"]


def load_spec(path: Path, overrides: dict[str, Any] | None = None) -> TrainSpec:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"spec '{path}' does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping at the top level")
    try:
        spec = TrainSpec(**data)
    except ValidationError as exc:
        raise UsageError(f"{path}: {_first(exc)}") from None
    if overrides:
        opts = dict(spec.options)
        train = dict(opts.get("train", {}))
        train.update(overrides)
        optim = dict(train.get("optim", {}))
        if "steps" in overrides and optim.get("warmup_steps", 0) > overrides["steps"]:
            optim["warmup_steps"] = overrides["steps"]  # --steps shortened the run below its warm-up: shorten that too
            train["optim"] = optim
        opts["train"] = train
        spec = spec.model_copy(update={"options": opts})
    try:
        spec.job_options()
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return spec
