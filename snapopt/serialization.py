"""Save and reload optimised pipelines.

Where diffusers' config can express a component, it is saved with ``save_pretrained`` and the folder loads
with ``StableDiffusionPipeline.from_pretrained``. Where it cannot (a lone attention removed from a block, say),
the component is saved as safetensors plus ``snapopt_arch.json``: the diffusers config it started from and
the structural edits (pass name + options) that rebuild its architecture exactly; :func:`load` replays
them on the meta device and loads the weights. Attention implementations are recorded and re-applied.
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


def _plain_config(module) -> dict[str, Any]:
    cfg = module.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(cfg, default=list))


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
def save(pipe: Pipeline, folder: Path, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write ``pipe`` to ``folder`` (created). Returns the manifest written."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if pipe.structure_only:
        raise ModelRefError("cannot save a structure-only (meta) pipeline: it has no weights")
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "source": pipe.source, "resolution": pipe.resolution,
        "prediction_type": pipe.prediction_type, "components": {},
    }
    all_diffusers = True
    for attr in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, attr)
        if module is None:
            continue
        entry: dict[str, Any] = {"attention": attention_kinds(module)}
        expressible = not getattr(module, EDITS_ATTR, None) or config_expresses(module)
        if expressible:
            to_save = module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)
            to_save.save_pretrained(folder / attr, safe_serialization=True)
            entry["format"] = "diffusers"
        else:
            all_diffusers = False
            sub = folder / attr
            sub.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(sub / "model.safetensors"))
            (sub / ARCH_FILE).write_text(json.dumps({
                "class": f"{type(module).__module__}:{type(module).__name__}",
                "base_config": getattr(module, BASE_ATTR, _plain_config(module)),
                "edits": getattr(module, EDITS_ATTR, []),
            }, indent=2))
            entry["format"] = "snapopt"
        manifest["components"][attr] = entry
    if pipe.tokenizer is not None:
        from snapopt.models.tokenizer import write_bpe_files

        pipe.tokenizer.save_pretrained(folder / "tokenizer")
        write_bpe_files(pipe.tokenizer, folder / "tokenizer")  # for Swift and older transformers
    if pipe.scheduler is not None:
        pipe.scheduler.save_pretrained(folder / "scheduler")
    if all_diffusers and pipe.unet is not None and pipe.vae is not None and pipe.text_encoder is not None:
        _write_model_index(folder, pipe)
    manifest["diffusers_loadable"] = (folder / "model_index.json").is_file()
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_model_index(folder: Path, pipe: Pipeline) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(pipe.scheduler).__name__],
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
        else:
            module = _rebuild(folder / attr, classes[attr])
        for name, kind in entry.get("attention", {}).items():
            mods = attention_modules(module)
            if name in mods:
                mods[name].set_processor(make_processor(kind))
        modules[attr] = module.eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer") if (folder / "tokenizer").is_dir() else None
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler") if (folder / "scheduler").is_dir() else None
    return Pipeline(source=str(folder), tokenizer=tokenizer, scheduler=scheduler, resolution=manifest["resolution"],
                    prediction_type=manifest.get("prediction_type", "epsilon"), **modules)


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
