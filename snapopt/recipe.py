"""Recipes: what ``snapopt apply`` runs, validated whole before anything runs.

Unknown keys, wrong types, unknown pass or target names all fail here with one line naming the field.
The resolved recipe (defaults filled in) is echoed into the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapopt.devices.target import format_validation_error
from snapopt.errors import RecipeError, SnapoptError
from snapopt.lowering.spec import ExportSpec

Component = Literal["unet", "vae_decoder", "vae_encoder", "text_encoder"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class PassStep(_Strict):
    pass_: str = Field(alias="pass", description="registered name, 'module:Class' or 'file.py[:Class]'")
    options: dict[str, Any] = Field(default_factory=dict)


class VerifySpec(_Strict):
    enabled: bool = True
    tolerance: float = Field(1e-4, gt=0)


class OutputSpec(_Strict):
    save_model: bool = True
    dtype: Literal["float32", "float16"] = "float32"


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: str = "zoo:snapshapes"
    resolution: int | None = Field(None, gt=0, multiple_of=8, description="image side; default: the model's")
    batch: int = Field(2, ge=1, description="UNet batch; 2 under classifier-free guidance")
    seed: int = 0
    plugins: list[str] = Field(default_factory=list, description="pass files or modules to register")
    passes: list[PassStep] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=lambda: ["iphone-14-pro"])
    export: ExportSpec = Field(default_factory=ExportSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    output: OutputSpec = Field(default_factory=OutputSpec)


class ResolvedRecipe:
    """A validated recipe with its passes instantiated and targets resolved."""

    def __init__(self, recipe: Recipe, path: Path | None, passes: list, targets: list):
        self.recipe = recipe
        self.path = path
        self.passes = passes
        self.targets = targets

    def to_dict(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json", by_alias=True)
        data["passes"] = [{"pass": p.name, "options": p.options.model_dump(mode="json")} for p in self.passes]
        return data


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> ResolvedRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc.__class__.__name__)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_recipe(data, path)


def validate_recipe(data: dict[str, Any], path: Path | None = None) -> ResolvedRecipe:
    from snapopt.core.registry import PASSES
    from snapopt.devices.registry import TARGETS

    where = f"{path}: " if path else "recipe: "
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(where + format_validation_error(exc)) from None
    base = path.parent if path else Path.cwd()
    for i, spec in enumerate(recipe.plugins):
        try:
            PASSES.load_spec(spec, base_dir=base)
        except SnapoptError as exc:
            raise RecipeError(f"{where}plugins[{i}]: {exc}") from None
    passes = []
    for i, step in enumerate(recipe.passes):
        try:
            cls = PASSES.resolve(step.pass_, base_dir=base)
        except SnapoptError as exc:
            raise RecipeError(f"{where}passes[{i}].pass: {exc}") from None
        try:
            passes.append(cls(cls.Options.model_validate(step.options)))
        except ValidationError as exc:
            raise RecipeError(f"{where}passes[{i}].options.{format_validation_error(exc)}") from None
    targets = []
    for i, ref in enumerate(recipe.targets):
        try:
            is_file = ref.endswith((".yaml", ".yml"))
            targets.append(TARGETS.resolve(str(base / ref) if is_file and not Path(ref).is_absolute() else ref))  # files: relative to the recipe
        except SnapoptError as exc:
            raise RecipeError(f"{where}targets[{i}]: {exc}") from None
    try:
        check_model_ref(recipe.model, base)
    except SnapoptError as exc:
        raise RecipeError(f"{where}model: {exc}") from None
    return ResolvedRecipe(recipe, path, passes, targets)


def check_model_ref(ref: str, base: Path | None = None) -> None:
    """Cheap validation of a model reference, without loading weights."""
    from snapopt.errors import ModelRefError
    from snapopt.models.loading import _looks_like_hub_id
    from snapopt.models.presets import preset

    if ref.startswith("arch:"):
        preset(ref[5:])
    elif ref.startswith("zoo:"):
        from snapopt import zoo

        try:
            zoo.zoo_path(ref[4:])
        except ValueError as exc:
            raise ModelRefError(str(exc)) from None
    elif Path(ref).expanduser().exists():
        return
    elif not _looks_like_hub_id(ref):
        raise ModelRefError(f"'{ref}' is neither an existing folder, 'arch:<preset>', 'zoo:<name>' nor a hub id 'org/name'")
