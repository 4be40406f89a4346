"""Model references and model folders, checked before anything loads: the reference is usable, every file
the loader will read parses, configs have the types their classes expect and build, safetensors headers are
intact and hold every tensor the config needs (shapes too), weights are finite, a tokenizer is present.

A hub id is checked against the local cache, then against the network with short timeouts, so an offline
machine gets one line in seconds. All failures are :class:`~snapopt.errors.ModelRefError` (exit 2) naming the
file and field.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import struct
import threading
import types
import typing
from pathlib import Path
from typing import Any, Iterable

from snapopt.checks.files import load_json_file
from snapopt.errors import ModelRefError

#: longest reference accepted (a path or hub id; PATH_MAX on Linux is 4096)
MAX_REF = 1024
_POSITIVE = re.compile(r"(channels|sample_size|layers_per_block|_dim|norm_num_groups|hidden_size|intermediate_size|"
                       r"num_hidden_layers|num_attention_heads|vocab_size|max_position_embeddings)$")
_LIMIT = 1 << 20
_MODEL_CLASSES = {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "CLIPTextModelWithProjection"}
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                       "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# ---- references -------------------------------------------------------------------------------------------
def check_model_reference(ref: str, base: Path | None = None, *, components: Iterable[str] = ("unet", "vae", "text_encoder"),
                          finite: bool = True) -> Path | None:
    """Check ``ref`` deeply enough that loading it cannot fail on bad input. Returns the folder it names
    (None for ``arch:`` presets and uncached hub ids that are reachable)."""
    ref = str(ref)
    if len(ref) > MAX_REF:
        raise ModelRefError(f"model reference is {len(ref):,} characters long (at most {MAX_REF}): '{ref[:40]}…'")
    if any(ord(c) < 32 for c in ref):
        raise ModelRefError(f"model reference {ref[:60]!r} contains control characters")
    ref = ref.strip()
    if ref.startswith("arch:"):
        from snapopt.models.presets import preset

        preset(ref[5:])
        return None
    if ref.startswith("zoo:"):
        from snapopt import zoo

        try:
            folder = Path(zoo.zoo_path(ref[4:]))
        except ValueError as exc:
            raise ModelRefError(str(exc)) from None
        check_model_folder(folder, components, finite=finite)
        return folder
    try:
        path = Path(ref).expanduser()
        exists = path.exists()
    except RuntimeError as exc:  # '~user/x' for a user that does not exist
        raise ModelRefError(f"model '{ref[:60]}': {exc}") from None
    except OSError as exc:
        raise ModelRefError(f"model '{ref[:60]}': {exc.strerror or exc.__class__.__name__}") from None
    if exists:
        check_model_folder(path, components, finite=finite)
        return path
    from snapopt.models.loading import _looks_like_hub_id

    if not _looks_like_hub_id(ref):
        raise ModelRefError(f"model '{ref}' is neither an existing folder, 'arch:<preset>', 'zoo:<name>' nor a hub id 'org/name'")
    cached = _hub_cache_folder(ref)
    if cached is not None:
        check_model_folder(cached, components, finite=finite)
        return cached
    check_hub_reachable(ref)
    return None


def _hub_cache_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Raise within about ``2 * timeout`` seconds if the hub cannot be reached (name lookup included: a
    socket timeout does not bound getaddrinfo, so it runs in a thread)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ModelRefError(f"cannot load '{repo_id}': it is not in the local cache and HF_HUB_OFFLINE is set; "
                            "pass a local pipeline folder")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    result: dict[str, Any] = {}

    def resolve():
        try:
            result["addr"] = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)[0][4]
        except OSError as exc:
            result["error"] = exc

    t = threading.Thread(target=resolve, daemon=True)
    t.start()
    t.join(timeout)
    reason = None
    if "addr" not in result:
        reason = f"cannot resolve {host}" + (f": {result['error'].__class__.__name__}" if "error" in result else " (timed out)")
    else:
        try:
            socket.create_connection(result["addr"][:2], timeout=timeout).close()
        except OSError as exc:
            reason = f"{host}: {exc.__class__.__name__}"
    if reason:
        raise ModelRefError(f"cannot load '{repo_id}': the Hugging Face hub is unreachable ({reason}); "
                            "download the pipeline elsewhere and pass its local folder")


# ---- folders ------------------------------------------------------------------------------------------------
def check_model_folder(folder: str | Path, components: Iterable[str] = ("unet", "vae", "text_encoder"), *,
                       finite: bool = True) -> None:
    """Every file a load of ``components`` reads from a diffusers pipeline folder (or a snapopt run's model
    folder) is checked. ``finite`` also reads every weight once to check it holds no NaN/inf."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelRefError(f"model '{folder}' is a file, not a pipeline folder")
    index_file = folder / "model_index.json"
    snapopt_manifest = folder / "snapopt.json"
    if snapopt_manifest.exists():
        manifest = load_json_file(snapopt_manifest, "model manifest")
        if not isinstance(manifest, dict):
            raise ModelRefError(f"model manifest '{snapopt_manifest}' is not a JSON object")
        for extra in folder.rglob("snapopt_arch.json"):
            data = load_json_file(extra, "model structure file")
            if not isinstance(data, dict):
                raise ModelRefError(f"model structure file '{extra}' is not a JSON object")
    if not index_file.is_file():
        if snapopt_manifest.exists():
            index: dict[str, Any] = {c: ["?", "?"] for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                                     if (folder / c).is_dir()}
        elif (folder / "config.json").is_file():
            raise ModelRefError(f"'{folder}' holds a single model, not a pipeline; pass its parent pipeline folder")
        else:
            raise ModelRefError(f"'{folder}' is not a diffusers pipeline folder: '{index_file}' is missing")
    else:
        index = load_json_file(index_file, "model index")
        if not isinstance(index, dict):
            raise ModelRefError(f"model index '{index_file}' is not a JSON object")
        for key, value in index.items():
            if key.startswith("_") or not isinstance(value, list):
                continue
            if len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
                raise ModelRefError(f"model index '{index_file}': '{key}' must be [library, class], got {json.dumps(value)[:80]}")
    wanted = set(components)
    structured = snapopt_manifest.exists()
    for comp in ("unet", "vae", "text_encoder"):
        if comp not in wanted:
            continue
        entry = index.get(comp)
        if not entry or entry[0] is None:
            raise ModelRefError(f"model index '{index_file}' lists no '{comp}'")
        _check_component(folder / comp, entry[1], finite=finite, structured=structured)
    if "text_encoder" in wanted or "tokenizer" in index:
        _check_tokenizer(folder / "tokenizer", folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.exists() or "scheduler" in index:
        if not sched.is_file():
            raise ModelRefError(f"scheduler config '{sched}' is missing")
        cfg = load_json_file(sched, "scheduler config")
        if not isinstance(cfg, dict):
            raise ModelRefError(f"scheduler config '{sched}' is not a JSON object")


def _check_tokenizer(tok: Path, folder: Path) -> None:
    if not tok.is_dir():
        raise ModelRefError(f"tokenizer folder '{tok}' is missing (a text encoder needs its tokenizer)")
    has_bpe = (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    has_fast = (tok / "tokenizer.json").is_file()
    if not (has_bpe or has_fast):
        raise ModelRefError(f"tokenizer '{tok}' has neither vocab.json + merges.txt nor tokenizer.json")
    for name in ("vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).is_file():
            data = load_json_file(tok / name, "tokenizer file")
            if not isinstance(data, dict):
                raise ModelRefError(f"tokenizer file '{tok / name}' is not a JSON object")
    if has_bpe:
        from snapopt.checks.files import read_text_file

        read_text_file(tok / "merges.txt", "tokenizer file", max_bytes=64 << 20)


def _check_component(sub: Path, class_name: str | None, *, finite: bool, structured: bool) -> None:
    if not sub.is_dir():
        raise ModelRefError(f"model component folder '{sub}' is missing")
    cfg_file = sub / "config.json"
    if not cfg_file.is_file():
        if structured and any(sub.glob("*.json")):  # a snapopt structure file describes it instead
            for f in sub.glob("*.json"):
                load_json_file(f, "model structure file")
            _read_weights(sub)
            return
        raise ModelRefError(f"'{cfg_file}' is missing")
    cfg = load_json_file(cfg_file, "model config")
    if not isinstance(cfg, dict):
        raise ModelRefError(f"model config '{cfg_file}' is not a JSON object")
    cls_name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0] if isinstance(cfg.get("architectures", []), list) else None
    cls_name = cls_name if isinstance(cls_name, str) else class_name
    headers = _read_weights(sub)
    expected = None
    if cls_name in _MODEL_CLASSES:
        cls, config_cls = _model_class(cls_name)
        _check_types(cfg, config_cls or cls, cfg_file)
        if not structured:
            expected = _expected_tensors(cls, config_cls, cfg, cfg_file)
    present = {k: v for h in headers.values() for k, v in h.items()}
    if expected is not None and present and set(present) <= set(expected):
        missing = [k for k in expected if k not in present]
        if missing:
            raise ModelRefError(f"{_weights_name(sub, headers)}: {len(missing)} tensor(s) the config needs are missing "
                                f"(first: '{missing[0]}')")
        for k, meta in present.items():
            if list(meta["shape"]) != list(expected[k]):
                raise ModelRefError(f"{_weights_name(sub, headers)}: tensor '{k}' has shape {meta['shape']} but "
                                    f"{cfg_file.name} needs {list(expected[k])}")
    if finite:
        for file in headers:
            _check_finite_file(file)


def _weights_name(sub: Path, headers: dict) -> str:
    return str(next(iter(headers))) if len(headers) == 1 else str(sub)


def _model_class(name: str):
    if name in ("UNet2DConditionModel", "AutoencoderKL"):
        import diffusers

        return getattr(diffusers, name), None
    import transformers

    return getattr(transformers, name), transformers.CLIPTextConfig


def _read_weights(sub: Path) -> dict[Path, dict[str, dict]]:
    """Headers of the component's safetensors files, each checked against the file's size."""
    files = sorted(sub.glob("*.safetensors"))
    index = sorted(sub.glob("*.safetensors.index.json"))
    if index:
        idx = load_json_file(index[0], "weights index")
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            raise ModelRefError(f"weights index '{index[0]}' has no weight_map")
        for shard in sorted(set(map(str, wm.values()))):
            if not (sub / shard).is_file():
                raise ModelRefError(f"weights index '{index[0]}' names shard '{shard}', which is missing")
    if not files:
        pickled = [f.name for f in sub.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        extra = f" (found {pickled[0]}: pickled weights are never loaded)" if pickled else ""
        raise ModelRefError(f"model component folder '{sub}' has no .safetensors weights{extra}")
    return {f: read_safetensors_header(f) for f in files}


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file, after checking it against the file: header length, JSON,
    dtypes, and every tensor's byte range inside the file (a truncated copy fails here, naming the file)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelRefError(f"weights '{file}' is truncated ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ModelRefError(f"weights '{file}' is not a safetensors file or is truncated (header of {n:,} bytes in a {size:,}-byte file)")
            raw = f.read(n)
    except OSError as exc:
        raise ModelRefError(f"weights '{file}' cannot be read: {exc.strerror or exc.__class__.__name__}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelRefError(f"weights '{file}' has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelRefError(f"weights '{file}' has a corrupt safetensors header")
    body = size - 8 - n
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            count = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                count *= d
            ok = dtype in _SAFETENSORS_DTYPES and 0 <= start <= end and end - start == count * _SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelRefError(f"weights '{file}': entry '{name}' in the header is malformed")
        if end > body:
            raise ModelRefError(f"weights '{file}' is truncated: tensor '{name}' ends at byte {end:,} of a {body:,}-byte body")
        tensors[name] = {"dtype": dtype, "shape": list(shape)}
    return tensors


def _check_finite_file(file: Path) -> None:
    """Read every tensor once; a float64 sum is finite exactly when no element is NaN/inf (weights are far
    below 1e300). numpy, not torch: one reduction per tensor without thread start-up is 10-30x faster here."""
    from safetensors import safe_open

    try:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    _finite_or_raise(file, name, f.get_tensor(name))
            return
        except (TypeError, ValueError):  # bfloat16 / fp8 have no numpy dtype: read through torch
            pass
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                _finite_or_raise(file, name, t.float().numpy() if t.is_floating_point() else t.numpy())
    except ModelRefError:
        raise
    except Exception as exc:  # safetensors' own checks (overlapping ranges, bad dtypes …)
        raise ModelRefError(f"weights '{file}' cannot be read: {str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}") from None


def _finite_or_raise(file: Path, name: str, a) -> None:
    import numpy as np

    if a.dtype.kind != "f" or np.isfinite(a.sum(dtype=np.float64)):
        return
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ModelRefError(f"weights '{file}': tensor '{name}' has {bad:,} non-finite values (NaN/inf) of {a.size:,}")


# ---- configs ----------------------------------------------------------------------------------------------
def _check_types(cfg: dict, cls: type, cfg_file: Path) -> None:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for key, value in cfg.items():
        if key.startswith("_") or key not in params:
            continue
        p = params[key]
        ok = _accepts(value, p.annotation)
        if ok is None and p.default is not inspect.Parameter.empty and p.default is not None:
            ok = _accepts(value, type(p.default)) if not isinstance(p.default, (list, tuple)) else isinstance(value, (list, tuple))
        if ok is False:
            raise ModelRefError(f"model config '{cfg_file}': field '{key}' has the wrong type (got {json.dumps(value)[:60]}; "
                                f"expected {_describe(p.annotation, p.default)})")
        for v in (value if isinstance(value, list) else [value]):
            if _POSITIVE.search(key) and isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= _LIMIT:
                raise ModelRefError(f"model config '{cfg_file}': field '{key}' is {json.dumps(value)[:60]}; it must be between 1 and {_LIMIT:,}")


def _describe(ann, default) -> str:
    if ann is not inspect.Parameter.empty:
        return str(ann).replace("typing.", "")
    return type(default).__name__


_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None), "NoneType": type(None),
          "list": list, "tuple": tuple, "dict": dict}


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "|" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _accepts(value: Any, ann: Any) -> bool | None:
    """Does a JSON ``value`` fit annotation ``ann``? None when the annotation is not understood (accepted)."""
    if ann is inspect.Parameter.empty or ann is Any:
        return None
    if isinstance(ann, str):
        verdicts = []
        for alt in _split_top(ann):
            base = alt.strip().split("[")[0].strip().replace("typing.", "")
            base = {"Optional": None, "List": "list", "Tuple": "tuple", "Dict": "dict"}.get(base, base)
            if base not in _NAMES:
                return None
            verdicts.append(_accepts(value, _NAMES[base]))
        return any(v is not False for v in verdicts)
    origin = typing.get_origin(ann)
    args = [a for a in typing.get_args(ann) if a is not Ellipsis]
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, a) for a in args]
        return None if any(v is None for v in verdicts) and not any(verdicts) else any(v is not False for v in verdicts)
    if origin in (list, tuple) or ann in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        return all(any(_accepts(v, a) is not False for a in args) for v in value)
    if origin is dict or ann is dict:
        return isinstance(value, dict)
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if ann is type(None):
        return value is None
    return None


def _expected_tensors(cls: type, config_cls: type | None, cfg: dict, cfg_file: Path) -> dict[str, list[int]] | None:
    """Names and shapes of the tensors a model built from ``cfg`` has (built on the meta device: no memory)."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                if config_cls is not None:
                    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
                    model = cls(config_cls(**clean))
                else:
                    model = cls.from_config(cfg)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelRefError(f"model config '{cfg_file}' does not describe a buildable {cls.__name__}: {first[:200]}") from None
    sd = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    return {k: list(v.shape) for k, v in sd.items() if k not in tied}


# ---- loaded pipelines (for run.apply, after load_model) ---------------------------------------------------------
def check_pipeline_weights(pipe) -> None:
    """Every parameter and buffer of every loaded component is finite (covers arch:/hub models too)."""
    import torch

    for comp in pipe.components():
        module = pipe.component(comp)
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.device.type == "meta" or not t.is_floating_point():
                continue
            if not bool(torch.isfinite(t).all()):
                raise ModelRefError(f"model '{pipe.source}': {comp} weight '{name}' has non-finite values (NaN/inf)")


def check_pipeline_outputs(pipe, shapes, seed: int = 0) -> None:
    """Every loaded component runs at the recipe's shapes with finite outputs, before the first pass."""
    if getattr(pipe, "structure_only", False):
        return
    from snapopt.core.verify import check_finite, run_component

    for comp in pipe.components():
        try:
            out = run_component(pipe, comp, shapes, seed)
        except Exception as exc:
            raise ModelRefError(f"model '{pipe.source}': component '{comp}' does not run at resolution {shapes.resolution}, "
                                f"batch {shapes.batch}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        problem = check_finite(out)
        if problem:
            raise ModelRefError(f"model '{pipe.source}': {problem} at the recipe's shapes")
