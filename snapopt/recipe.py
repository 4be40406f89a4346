"""Recipes: what ``snapopt apply`` runs, validated whole before anything runs.

Unknown keys, wrong types, unknown pass or target names all fail here with one line naming the field.
The resolved recipe (defaults filled in) is echoed into the run folder.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from snapopt.errors import RecipeError, SnapoptError, UsageError
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
    deterministic: bool = Field(False, description="deterministic GPU kernels for the whole run, cuDNN autotuning off, undone "
                                "after it: toward the same model from a repeat on the same GPU and versions (two H100 chains "
                                "printed identical scores, 12-14% slower). CPU runs are reproducible without it")
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
        self.sets: list[str] = []  # the ``--set KEY=VALUE`` overrides applied, as given (load_recipe; the report records them)

    def to_dict(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json", by_alias=True)
        data["passes"] = [{"pass": p.name, "options": p.options.model_dump(mode="json")} for p in self.passes]
        return data


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> ResolvedRecipe:
    """Read (strict UTF-8 YAML: no duplicate keys, bounded size and depth), apply CLI overrides (``overrides``:
    whole top-level fields, as ``--model``; then ``sets``: ``--set KEY=VALUE``, see :func:`apply_sets`), validate."""
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
    sets = list(sets or [])
    applied = apply_sets(data, sets)
    try:
        resolved = validate_recipe(data, path)
    except RecipeError as exc:
        raise RecipeError(_blame_set(str(exc), applied)) from None
    resolved.sets = sets
    return resolved


# -- --set KEY=VALUE ---------------------------------------------------------------------------------------
# KEY grammar: segments joined by '.', each a name optionally followed by list indices ``[N]``:
#   seed=1, export.onnx=false, targets[0]=iphone-15-pro        top-level fields (the Recipe's own names)
#   recover.loss.timestep_scaling=true                          PASS.OPTION...: the options of the one pass named PASS
#   passes[1].options.train.steps=800                           by position, for a pass named twice (or a plugin path)
# VALUE is YAML. ``null`` removes the key, so the field or option takes its default.

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)$")


def parse_set(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → (KEY, VALUE parsed as YAML); one-line UsageError on anything else."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise UsageError(f"--set {_cut(text)!r}: expected KEY=VALUE (VALUE in YAML), e.g. seed=1 or recover.loss.timestep_scaling=true")
    try:
        return key, yaml.load(raw, Loader=_set_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc.__class__.__name__).split())
        raise UsageError(f"--set {_cut(key)}: VALUE {_cut(raw, 40)!r} is not valid YAML ({_cut(problem, 100)})") from None
    except RecursionError:
        raise UsageError(f"--set {_cut(key)}: VALUE nested too deep") from None


@functools.cache
def _set_loader():
    """The recipes' strict loader, plus YAML 1.2 floats without a dot (``1e-4``: a string to PyYAML's YAML 1.1),
    since that is how people write learning rates on a command line."""
    from snapopt.checks.files import _UniqueKeyLoader

    class SetLoader(_UniqueKeyLoader):
        pass

    SetLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))
    return SetLoader


def _path(key: str) -> list[str | int]:
    """``a.b[2].c`` → ['a', 'b', 2, 'c']."""
    out: list[str | int] = []
    for seg in key.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            raise UsageError(f"--set {_cut(key)}: bad KEY segment {_cut(seg, 40)!r} (names joined by '.', list items as [N], "
                             "e.g. passes[1].options.train.steps)")
        out.append(m.group(1))
        out += [int(i) for i in re.findall(r"\d+", m.group(2))]
    return out


def _pass_names(data: dict[str, Any]) -> list[str]:
    passes = data.get("passes") if isinstance(data.get("passes"), list) else []
    return [str(p.get("pass")) if isinstance(p, dict) else "?" for p in passes]


def _resolve_key(data: dict[str, Any], key: str) -> list[str | int]:
    """KEY → the path into the recipe mapping: a top-level field as written, or ``PASS.…`` →
    ``passes[i].options.…`` for the single pass named PASS."""
    path = _path(key)
    head = path[0]
    if head in Recipe.model_fields:
        return path
    names = _pass_names(data)
    where = [i for i, n in enumerate(names) if n == head]
    if not where:
        listed = ", ".join(names) or "none"
        raise UsageError(f"--set {_cut(key)}: '{head}' is neither a recipe field nor a pass of this recipe (passes: {listed})")
    if len(where) > 1:
        raise UsageError(f"--set {_cut(key)}: pass '{head}' occurs {len(where)} times (passes[{'], passes['.join(map(str, where))}]); "
                         f"name one by position, e.g. passes[{where[0]}].options.{'.'.join(map(str, path[1:])) or 'KEY'}")
    if len(path) == 1 or isinstance(path[1], int):
        raise UsageError(f"--set {_cut(key)}: name an option of pass '{head}' ({head}.OPTION=VALUE)")
    return ["passes", where[0], "options", *path[1:]]


def _show(path: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def apply_sets(data: dict[str, Any], sets: list[str]) -> list[tuple[str, str]]:
    """Apply ``--set KEY=VALUE`` overrides in order to the recipe mapping ``data`` (in place), before validation.

    Mappings missing on the way are created (an option the YAML leaves at its default; the pass's own option
    validation then accepts or rejects it); a ``null`` VALUE removes the key so its default applies. Returns
    (the path set, as validation errors name it; the override as given) for each, to blame in errors."""
    applied = []
    for text in sets:
        key, value = parse_set(text)
        path = _resolve_key(data, key)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            here = _show(path[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = f"{len(node)} items" if isinstance(node, list) else "not a list"
                    raise UsageError(f"--set {_cut(key)}: {here} does not exist ({_show(path[:i]) or 'recipe'}: {size})")
                child = node[part]
            else:
                if not isinstance(node, dict):
                    raise UsageError(f"--set {_cut(key)}: {_show(path[:i])} is not a mapping")
                child = node.get(part)
            if child is None:  # absent or null: a mapping to fill (a list index into it fails on the next step)
                if value is None:
                    break  # removing something under a missing mapping: already the default
                if isinstance(nxt, int):
                    raise UsageError(f"--set {_cut(key)}: {here} is not set, so it has no item [{nxt}]; set the whole list ({here}=[...])")
                child = {}
                node[part] = child
            elif (isinstance(nxt, int) and not isinstance(child, list)) or (isinstance(nxt, str) and not isinstance(child, dict)):
                kind = "list" if isinstance(nxt, int) else "mapping"
                raise UsageError(f"--set {_cut(key)}: {here} is {_cut(repr(child), 40)}, not a {kind}")
            node = child
        else:
            last = path[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or last >= len(node):
                    raise UsageError(f"--set {_cut(key)}: {_show(path)} does not exist")
                if value is None:
                    raise UsageError(f"--set {_cut(key)}: null cannot remove a list item; set the whole list ({_show(path[:-1])}=[...])")
                node[last] = value
            elif value is None:
                node.pop(last, None)
            else:
                node[last] = value
        applied.append((_show(path), text))
    return applied


def _blame_set(message: str, applied: list[tuple[str, str]]) -> str:
    """A validation error about a field an override set says so: ``... (from --set KEY=VALUE)``."""
    hit = [(p, t) for p, t in applied if any(f": {p}{end}" in message for end in (":", ".", "["))]
    if not hit:
        return message
    return f"{message} (from --set {_cut(max(hit, key=lambda h: len(h[0]))[1])})"


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
    if recipe.deterministic:
        for i, p in enumerate(passes):
            found = _key_path(p.options.model_dump(mode="json"), "cudnn_benchmark", True)
            if found:
                raise RecipeError(f"{where}passes[{i}].options.{found}: true conflicts with deterministic: true "
                                  "(cuDNN's autotuning picks kernels by timing); leave it unset")
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


def _key_path(data: Any, key: str, value: Any, prefix: str = "") -> str | None:
    """The dotted path of the first ``key`` holding ``value`` in nested options, else None."""
    if isinstance(data, dict):
        for k, v in data.items():
            here = f"{prefix}{k}"
            if k == key and v == value:
                return here
            found = _key_path(v, key, value, here + ".")
            if found:
                return found
    return None


def check_model_ref(ref: str, base: Path | None = None) -> None:
    """The model reference and every file a load of it reads (configs typed, safetensors intact and
    complete, weights finite, tokenizer present); a hub id must be cached or the hub reachable."""
    from snapopt.checks.model import check_model_reference

    check_model_reference(ref, base)
