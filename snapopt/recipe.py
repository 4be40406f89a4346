"""Recipes: what ``snapopt apply`` runs, validated whole before anything runs.

Unknown keys, wrong types, unknown pass or target names all fail here with one line naming the field.
The resolved recipe (defaults filled in) is echoed into the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    # finite and at most 1: a relative error above 1 (or inf) would switch the exactness check off
    tolerance: float = Field(1e-4, gt=0, le=1.0, allow_inf_nan=False)


class QualitySpec(_Strict):
    """Quality retained: the output at ``steps`` against the input at ``input_steps`` (snapshapes models)."""

    enabled: bool = True
    steps: int = Field(25, ge=1, le=1000, description="sampling steps the output runs at (default: a step_distill pass's student steps, else 25)")
    input_steps: int = Field(50, ge=1, le=1000)
    prompts: int = Field(16, ge=1, le=256)
    cfg: float = Field(7.5, ge=1, le=50)


class OutputSpec(_Strict):
    save_model: bool = True
    dtype: Literal["float32", "float16"] = "float32"


#: bounds: far beyond any real recipe, small enough that nothing downstream overflows or allocates terabytes
MAX_RESOLUTION = 4096
MAX_BATCH = 64
MAX_SEED = 2**32 - 1  # numpy's seed range; torch accepts it too


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    description: str = Field("", max_length=10_000)
    model: str = Field("zoo:snapshapes", min_length=1, max_length=1024)
    resolution: int | None = Field(None, gt=0, le=MAX_RESOLUTION, multiple_of=8, description="image side; default: the model's")
    batch: int = Field(2, ge=1, le=MAX_BATCH, description="UNet batch; 2 under classifier-free guidance")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    plugins: list[str] = Field(default_factory=list, max_length=32, description="pass files or modules to register")
    passes: list[PassStep] = Field(default_factory=list, max_length=200)
    targets: list[str] = Field(default_factory=lambda: ["iphone-14-pro"], max_length=32)
    export: ExportSpec = Field(default_factory=ExportSpec)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
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
    """Read (strict UTF-8 YAML: no duplicate keys, bounded size and depth), apply CLI overrides, validate."""
    from snapopt.checks.files import load_yaml_file

    path = Path(path)
    data = load_yaml_file(path, "recipe")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise RecipeError(f"{path}: key {str(bad_keys[0])[:40]!r} is not a string")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_recipe(data, path)


def format_validation_error(exc: ValidationError) -> str:
    """The first error as ``field.path: message (got value)``, one line, the value cut to 60 characters."""
    errors = exc.errors()
    # a misspelt key also makes the intended one "missing": name the misspelling first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
    msg = " ".join(str(err["msg"]).split())
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    value = err.get("input")
    shown = ""
    if err["type"] not in ("missing", "extra_forbidden") and not isinstance(value, (dict, list)):
        r = repr(value)
        shown = f" (got {r if len(r) <= 60 else r[:59] + '…'})"
    loc = loc if len(loc) <= 120 else loc[:119] + "…"
    return f"{loc or '<root>'}: {msg}{shown}"


def validate_recipe(data: dict[str, Any], path: Path | None = None, *, check_model: bool = True) -> ResolvedRecipe:
    """Validate everything a run will use before anything runs: fields and bounds, plugins, every pass's
    options, targets, the export section, and the model reference with its files (see snapopt.checks.model)."""
    from snapopt.core.registry import PASSES
    from snapopt.devices.registry import TARGETS

    where = f"{path}: " if path else "recipe: "
    if not isinstance(data, dict):
        raise RecipeError(f"{where}expected a mapping at the top level, got {type(data).__name__}")
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
        except SnapoptError as exc:
            raise RecipeError(f"{where}passes[{i}].options: {exc}") from None
        except Exception as exc:  # a plugin's option validator that raises something other than ValueError
            raise RecipeError(f"{where}passes[{i}].options: pass '{step.pass_}' rejected its options: "
                              f"{exc.__class__.__name__}: {str(exc)[:200]}") from None
    targets = []
    for i, ref in enumerate(recipe.targets):
        try:
            is_file = ref.endswith((".yaml", ".yml"))
            targets.append(TARGETS.resolve(str(base / ref) if is_file and not Path(ref).is_absolute() else ref))  # files: relative to the recipe
        except SnapoptError as exc:
            raise RecipeError(f"{where}targets[{i}]: {exc}") from None
        except OSError as exc:
            raise RecipeError(f"{where}targets[{i}]: cannot read '{ref[:80]}': {exc.strerror or exc.__class__.__name__}") from None
    if check_model:
        try:
            check_model_ref(recipe.model, base)
        except SnapoptError as exc:
            raise RecipeError(f"{where}model: {exc}") from None
    return ResolvedRecipe(recipe, path, passes, targets)


def check_model_ref(ref: str, base: Path | None = None) -> None:
    """The model reference and every file a load of it reads (configs typed, safetensors intact and
    complete, weights finite, tokenizer present); a hub id must be cached or the hub reachable."""
    from snapopt.checks.model import check_model_reference

    check_model_reference(ref, base)
