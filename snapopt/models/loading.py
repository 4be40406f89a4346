"""Resolve a model reference into a :class:`Pipeline`.

A reference is one of:
  * ``arch:<preset>``  – a known architecture with random weights (``arch:sd-v1.5``, ``arch:tiny`` …)
  * ``zoo:<name>``     – a model snapopt trains and ships itself (``zoo:snapshapes``)
  * a local folder     – a diffusers pipeline folder (``model_index.json``) or a snapopt run's model folder
  * a hub id           – ``org/name`` loaded with ``from_pretrained``; fails fast and clearly when offline
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import torch

from snapopt.errors import ModelRefError
from snapopt.models.pipeline import Pipeline
from snapopt.models.presets import preset

_DEFAULT_COMPONENTS = ("unet", "vae", "text_encoder")


def load_model(
    ref: str,
    *,
    components: Iterable[str] = _DEFAULT_COMPONENTS,
    structure_only: bool = False,
    seed: int = 0,
    resolution: int | None = None,
) -> Pipeline:
    """Load ``ref``. ``components`` picks the weights to load (``unet``, ``vae``, ``text_encoder``);
    ``structure_only`` builds arch presets on the meta device (instant; for capture, IR and latency)."""
    ref = str(ref).strip()
    wanted = tuple(components)
    if ref.startswith("arch:"):
        pipe = build_preset(ref[5:], components=wanted, structure_only=structure_only, seed=seed)
    elif ref.startswith("zoo:"):
        from snapopt import zoo

        try:
            folder = zoo.zoo_path(ref[4:])
        except ValueError as exc:
            raise ModelRefError(str(exc)) from None
        pipe = load_folder(folder, wanted, source=ref)
    elif _exists(ref):
        folder = Path(ref).expanduser()
        from snapopt.serialization import is_snapopt_model

        if is_snapopt_model(folder):
            from snapopt.serialization import load

            pipe = load(folder)
        else:
            pipe = load_folder(folder, wanted, source=ref)
    elif _looks_like_hub_id(ref):
        pipe = load_hub(ref, wanted)
    else:
        raise ModelRefError(
            f"model '{ref}' is neither an existing folder, 'arch:<preset>', 'zoo:<name>' nor a hub id 'org/name'"
        )
    if resolution is not None:
        pipe.resolution = int(resolution)
    return pipe


def build_preset(name: str, *, components: Iterable[str] = _DEFAULT_COMPONENTS, structure_only: bool = False, seed: int = 0) -> Pipeline:
    """Instantiate a preset with random weights (seeded), or on the meta device for structure-only work."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from snapopt.models.tokenizer import char_tokenizer, char_vocab

    spec = preset(name)
    wanted = set(components)
    vocab = char_vocab()
    device = torch.device("meta") if structure_only else torch.device("cpu")
    torch.manual_seed(seed)
    with device:
        unet = UNet2DConditionModel(**spec.unet).eval() if "unet" in wanted else None
        vae = AutoencoderKL(**spec.vae).eval() if "vae" in wanted else None
        text_encoder = None
        if "text_encoder" in wanted:
            config = CLIPTextConfig(
                **spec.text_encoder, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
            text_encoder = CLIPTextModel(config).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=spec.prediction_type,
    )
    return Pipeline(
        source=f"arch:{name}", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(),
        scheduler=scheduler, resolution=spec.resolution, prediction_type=spec.prediction_type, extra=dict(spec.extra),
    )


def load_folder(folder: Path, components: Iterable[str] = _DEFAULT_COMPONENTS, *, source: str | None = None) -> Pipeline:
    """Load the components of a diffusers pipeline folder (``model_index.json`` + one subfolder each)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        if (folder / "config.json").is_file():
            raise ModelRefError(f"'{folder}' holds a single model, not a pipeline; pass its parent pipeline folder")
        raise ModelRefError(f"'{folder}' is not a diffusers pipeline folder (no model_index.json)")
    from snapopt.checks.model import check_model_folder

    # configs typed, safetensors headers and tensor names sane, tokenizer present: one line naming the file
    # instead of an error from deep inside from_pretrained (finiteness is checked after load, once)
    check_model_folder(folder, _folder_components(components), finite=False)
    return _load_diffusers(str(folder), components, source=source or str(folder), local_files_only=True)


def _folder_components(components: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys("vae" if c.startswith("vae") else c for c in components))


def load_hub(repo_id: str, components: Iterable[str] = _DEFAULT_COMPONENTS) -> Pipeline:
    """``from_pretrained`` from the Hugging Face hub: the local cache first, then the network with short
    timeouts, so an offline machine gets one clear line in seconds instead of a long retry loop."""
    try:
        return _load_diffusers(repo_id, components, source=repo_id, local_files_only=True)
    except ModelRefError:
        pass
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")
    from snapopt.checks.model import check_hub_reachable

    check_hub_reachable(repo_id)  # bounded, DNS included: offline fails in seconds with one line
    return _load_diffusers(repo_id, components, source=repo_id, local_files_only=False)


def _exists(ref: str) -> bool:
    """Whether ``ref`` names a path; a reference the OS cannot even look up (too long, NUL) is bad input."""
    try:
        return Path(ref).expanduser().exists()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelRefError(f"model '{ref[:60]}': {exc.__class__.__name__}: {str(exc)[:80]}") from None


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "/", "~"))


def _load_diffusers(location: str, components: Iterable[str], *, source: str, local_files_only: bool) -> Pipeline:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    wanted = set(components)
    kw = dict(local_files_only=local_files_only)
    warnings.filterwarnings("ignore", module="huggingface_hub")
    try:
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **kw).eval() if "unet" in wanted else None
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **kw).eval() if "vae" in wanted else None
        text_encoder = (
            CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **kw).eval() if "text_encoder" in wanted else None
        )
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler", **kw)  # what snapopt samples with
        shipped = _shipped_scheduler(location, kw)  # what the model ships (PNDM for SD-v1.5); saved outputs keep it
    except (OSError, ValueError, TypeError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelRefError(f"cannot load '{source}': {first}") from None
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    sample = unet.config.sample_size if unet is not None else 64
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return Pipeline(
        source=source, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        resolution=int(sample) * vae_factor, prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        extra={"scheduler": shipped},
    )


def _shipped_scheduler(location: str, kw: dict):
    """The scheduler class model_index.json names, loaded from its config (None if not a diffusers class)."""
    import json

    import diffusers

    index = Path(location) / "model_index.json"
    if not index.is_file():
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(location, "model_index.json", **kw))
    name = (json.loads(index.read_text()).get("scheduler") or [None, None])[1]
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls.from_pretrained(location, subfolder="scheduler", **kw) if cls is not None else None
