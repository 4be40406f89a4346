"""Save and reload optimised pipelines.

Every saved folder is a diffusers pipeline folder. Where diffusers' config can express a component, it is
saved with ``save_pretrained``. Where it cannot (a lone attention removed from a block, channel-pruned
widths), it is saved as a diffusers custom component: its config.json is the plain diffusers config plus
``snapopt_structure`` (the structural edits as data, see :mod:`snapopt.models.portable`) and the code that
reads it is saved beside the weights, so ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
loads it in a process without snapopt, and the structure never depends on the pass that made it. Only
structures that description cannot hold fall back to ``snapopt_arch.json`` (config + pass edits replayed by
snapopt). Attention implementations are recorded and re-applied by :func:`load`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from snapopt.errors import ModelRefError
from snapopt.models.attention import attention_kinds, attention_modules, make_processor
from snapopt.models.pipeline import Pipeline

MANIFEST = "snapopt.json"
ARCH_FILE = "snapopt_arch.json"
FORMAT_VERSION = 1
EDITS_ATTR = "_snapopt_edits"
BASE_ATTR = "_snapopt_base_config"


# ---- structural edit log ------------------------------------------------------------------------------
def remember_base_config(module: torch.nn.Module) -> None:
    """Record the config a module had before its first structural edit (what replays start from)."""
    if not hasattr(module, BASE_ATTR):
        setattr(module, BASE_ATTR, _plain_config(module))


def record_edit(module: torch.nn.Module, pass_name: str, options: dict[str, Any]) -> None:
    """Append a structural edit to a module's log (the manager calls this for structural passes)."""
    remember_base_config(module)
    setattr(module, EDITS_ATTR, list(getattr(module, EDITS_ATTR, [])) + [{"pass": pass_name, "options": options}])


def edit_log(module: torch.nn.Module) -> dict[str, Any] | None:
    """The module's structural edit log (base config + edits) as JSON, or None if it was never edited.
    Saved in the manifest so a reloaded model keeps it: recovery's stage map follows removed stages through it,
    and ``snapopt apply --resume`` continues from reloaded passes' results."""
    if not hasattr(module, BASE_ATTR) and not hasattr(module, EDITS_ATTR):
        return None
    return {"base_config": getattr(module, BASE_ATTR, None), "edits": list(getattr(module, EDITS_ATTR, []))}


def restore_edit_log(module: torch.nn.Module, log: dict[str, Any]) -> None:
    if log.get("base_config") is not None:
        setattr(module, BASE_ATTR, log["base_config"])
    setattr(module, EDITS_ATTR, list(log.get("edits", [])))


def _plain_config(module) -> dict[str, Any]:
    cfg = module.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def config_expresses(module: torch.nn.Module) -> bool:
    """Whether ``module``'s own config rebuilds exactly its parameters (names and shapes), i.e. whether
    ``save_pretrained`` can hold it. UNets get their config re-derived from their modules first."""
    from snapopt.models.unet_config import derive_unet_config

    if type(module).__name__ == "UNet2DConditionModel":
        return derive_unet_config(module) is not None
    cls = type(module)
    try:
        with torch.device("meta"):
            probe = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
    except Exception:
        return False
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return shapes(probe) == shapes(module)


def is_snapopt_model(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


# ---- save -------------------------------------------------------------------------------------------
def _diffusers_base(module: torch.nn.Module):
    """The plain diffusers class a (possibly structured) module derives from, or None."""
    from snapopt.models.portable import STRUCTURED

    for cls in type(module).__mro__:
        if cls.__name__ in STRUCTURED and cls.__module__.startswith("diffusers"):
            return cls
    return None


def plain_config(module: torch.nn.Module) -> dict[str, Any]:
    """The module's diffusers config without snapopt's structure (what the structure's edits start from)."""
    from snapopt.models.portable import STRUCTURE_KEY

    return {k: v for k, v in _plain_config(module).items() if k != STRUCTURE_KEY and not k.startswith("_")}


def describe_structure(module: torch.nn.Module) -> list[dict[str, Any]] | None:
    """The edits (data) that rebuild ``module``'s structure from its plain diffusers config, proven by
    rebuilding on the meta device and comparing every parameter name, shape, module type and read
    attribute; None when the portable description cannot hold this structure."""
    from snapopt.models.portable import STRUCTURED, diff_structure

    base_cls = _diffusers_base(module)
    if base_cls is None:
        return None
    if any(getattr(m, "kv_heads", None) is not None for m in module.modules()):
        return None  # grouped/multi-query attention needs snapopt's processor: diffusers' own would compute it wrong
    cfg = plain_config(module)
    try:
        with torch.device("meta"):
            ops = diff_structure(module, base_cls.from_config(cfg))
            probe = STRUCTURED[base_cls.__name__].from_config({**cfg, "snapopt_structure": {"format": 1, "edits": ops}})
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        return None
    from snapopt.models.portable import _signature

    return ops if _signature(probe)[1:] == _signature(module)[1:] else None  # [0]: the class, structured vs plain


def save_structured(module: torch.nn.Module, sub: Path, ops: list[dict[str, Any]], dtype: torch.dtype) -> tuple[str, str]:
    """Write ``module`` as a diffusers custom component: weights, config.json (plain config + structure) and
    the component's code beside them. Returns its model_index.json entry (code file, class name)."""
    import diffusers

    from snapopt.models import portable

    base_cls = _diffusers_base(module)
    cls = portable.STRUCTURED[base_cls.__name__]
    cls_name = cls.__name__
    sub.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(sub / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {"_class_name": cls_name, "_diffusers_version": diffusers.__version__, **plain_config(module),
              portable.STRUCTURE_KEY: {"format": portable.FORMAT, "edits": ops}}
    (sub / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False))
    (sub / f"{cls.code_file}.py").write_text(Path(portable.__file__).read_text())
    return cls.code_file, cls_name


def save(pipe: Pipeline, folder: Path, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``pipe`` to ``folder`` (created) as a diffusers pipeline folder. Returns the manifest written.

    Each component is saved with ``save_pretrained`` when its plain diffusers config describes it, else as a
    diffusers custom component (config + ``snapopt_structure`` + the component's code beside the weights), so
    ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it without snapopt."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if pipe.structure_only:
        raise ModelRefError("cannot save a structure-only (meta) pipeline: it has no weights")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "source": pipe.source, "origin": pipe.extra.get("origin") or pipe.source,
        "resolution": pipe.resolution, "prediction_type": pipe.prediction_type, "components": {},
    }
    index: dict[str, list] = {}
    for attr in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, attr)
        if module is None:
            continue
        entry: dict[str, Any] = {"attention": attention_kinds(module)}
        structured = _diffusers_base(module) is not None and type(module) is not _diffusers_base(module)
        ops = None
        if not structured and config_expresses(module):
            to_save = module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)
            to_save.save_pretrained(folder / attr, safe_serialization=True)
            entry["format"] = "diffusers"
            lib = "transformers" if attr == "text_encoder" else "diffusers"
            index[attr] = [lib, type(module).__name__]
        elif (ops := describe_structure(module)) is not None:
            index[attr] = list(save_structured(module, folder / attr, ops, dtype))
            entry["format"] = "structured"
            entry["edits"] = len(ops)
            _write_arch(module, folder / attr)  # provenance only: which passes made it (loading reads config.json)
        else:
            sub = folder / attr
            sub.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(sub / "model.safetensors"))
            _write_arch(module, sub)
            entry["format"] = "snapopt"
        log = edit_log(module)
        if log is not None:
            entry["edit_log"] = log
        manifest["components"][attr] = entry
    if pipe.tokenizer is not None:
        from snapopt.models.tokenizer import write_bpe_files

        pipe.tokenizer.save_pretrained(folder / "tokenizer")
        write_bpe_files(pipe.tokenizer, folder / "tokenizer")  # for Swift and older transformers
    scheduler = output_scheduler(pipe)
    if scheduler is not None:
        scheduler.save_pretrained(folder / "scheduler")
        manifest["scheduler"] = type(scheduler).__name__
    if len(index) == 3 and pipe.tokenizer is not None and scheduler is not None:
        _write_model_index(folder, index, scheduler)
    manifest["diffusers_loadable"] = (folder / "model_index.json").is_file()
    manifest["needs_trust_remote_code"] = any(e["format"] == "structured" for e in manifest["components"].values())
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_arch(module: torch.nn.Module, sub: Path) -> None:
    """The pass log of a structurally edited module: the config it started from and each structural pass with
    its options. :func:`load` replays it only for structures config.json cannot hold (format "snapopt")."""
    (sub / ARCH_FILE).write_text(json.dumps({
        "class": f"{type(module).__module__}:{type(module).__name__}",
        "base_config": getattr(module, BASE_ATTR, _plain_config(module)),
        "edits": getattr(module, EDITS_ATTR, []),
    }, indent=2))


def output_scheduler(pipe: Pipeline):
    """The scheduler a saved model ships: the input model's own (``extra['scheduler']``, e.g. PNDM), else
    the one snapopt samples with."""
    return pipe.extra.get("scheduler") or pipe.scheduler


def _write_model_index(folder: Path, components: dict[str, list], scheduler) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__, **components,
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", type(scheduler).__name__],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


# ---- load -------------------------------------------------------------------------------------------
def load(folder: str | Path) -> Pipeline:
    """Reload a pipeline written by :func:`save` (``snapopt.load``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if not is_snapopt_model(folder):
        raise ModelRefError(f"'{folder}' is not a snapopt model folder (no {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelRefError(f"'{folder / MANIFEST}': unsupported format_version {manifest.get('format_version')!r}")
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    modules: dict[str, Any] = {}
    for attr, entry in manifest["components"].items():
        if entry["format"] == "diffusers":
            module = classes[attr].from_pretrained(folder / attr, torch_dtype=torch.float32)
        elif entry["format"] == "structured":
            from snapopt.models.portable import STRUCTURED

            module = STRUCTURED[classes[attr].__name__].from_pretrained(folder / attr, torch_dtype=torch.float32)
        else:
            module = _rebuild(folder / attr, classes[attr])
        if entry.get("edit_log") is not None and not hasattr(module, EDITS_ATTR):
            restore_edit_log(module, entry["edit_log"])
        for name, kind in entry.get("attention", {}).items():
            mods = attention_modules(module)
            if name in mods:
                mods[name].set_processor(make_processor(kind))
        modules[attr] = module.eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    scheduler, shipped = None, None
    if (folder / "scheduler").is_dir():
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")  # what snapopt samples with
        shipped = load_scheduler(folder / "scheduler")                    # what the folder ships, kept on save
    return Pipeline(source=str(folder), tokenizer=tokenizer, scheduler=scheduler, resolution=manifest["resolution"],
                    prediction_type=manifest.get("prediction_type", "epsilon"), extra={"scheduler": shipped, "origin": manifest.get("origin", manifest["source"])}, **modules)


def load_scheduler(sub: Path):
    """The scheduler class a folder's ``scheduler_config.json`` names (diffusers' own classes only)."""
    import diffusers

    name = json.loads((Path(sub) / "scheduler_config.json").read_text()).get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelRefError(f"'{sub}/scheduler_config.json': unknown scheduler class '{name}'")
    return cls.from_pretrained(sub)


def _rebuild(sub: Path, cls) -> torch.nn.Module:
    from snapopt.core.pass_base import PassContext
    from snapopt.core.registry import PASSES

    arch = json.loads((sub / ARCH_FILE).read_text())
    if hasattr(cls, "from_config"):
        module = cls.from_config(arch["base_config"])
    else:
        module = cls(cls.config_class(**arch["base_config"]))
    attr = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}[cls.__name__]
    shell = Pipeline(source=str(sub), **{attr: module})
    for edit in arch["edits"]:
        p = PASSES.get(edit["pass"])(edit["options"])
        shell = p.run(shell, PassContext()).program
    module = getattr(shell, attr)
    state = load_file(str(sub / "model.safetensors"))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    setattr(module, BASE_ATTR, arch["base_config"])
    setattr(module, EDITS_ATTR, arch["edits"])
    return module
