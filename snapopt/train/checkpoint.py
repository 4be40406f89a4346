"""Checkpoints a killed run can resume from exactly: weights, EMA and optimizer state as safetensors
pieces (each under ``shard_mb``, so they fit transfer limits), everything else as JSON.

A checkpoint folder is written under a temporary name and renamed when complete, so a run killed while
saving leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, stem: str, shard_mb: float) -> list[str]:
    """Write ``tensors`` as ``stem-00000.safetensors`` … each at most ``shard_mb`` (a bigger single tensor gets its own piece)."""
    limit = int(shard_mb * 1e6)
    pieces: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach()
        t = t.clone().contiguous() if t.device.type == "cpu" else t.contiguous().cpu()  # no shared storage
        nbytes = t.numel() * t.element_size()
        if pieces[-1] and size + nbytes > limit:
            pieces.append({})
            size = 0
        pieces[-1][name] = t
        size += nbytes
    files = []
    for i, piece in enumerate(pieces):
        f = f"{stem}-{i:05d}.safetensors"
        save_file(piece, str(folder / f))
        files.append(f)
    return files


def load_sharded(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob(f"{stem}-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def optimizer_split(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (tensors, JSON): ``state.<param>.<key>`` tensors + param_groups."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def write(root: Path, step: int, *, model: dict[str, torch.Tensor], optimizer: dict[str, Any], ema: dict[str, torch.Tensor] | None,
          meta: dict[str, Any], shard_mb: float, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = save_sharded(model, tmp, "model", shard_mb)
    opt_tensors, opt_meta = optimizer_split(optimizer)
    files += save_sharded(opt_tensors, tmp, "optimizer", shard_mb)
    if ema is not None:
        files += save_sharded(ema, tmp, "ema", shard_mb)
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "trainer.json").write_text(json.dumps(dict(meta, step=step, files=files), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "trainer.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def read(folder: Path) -> dict[str, Any]:
    meta = json.loads((folder / "trainer.json").read_text())
    opt = optimizer_join(load_sharded(folder, "optimizer"), json.loads((folder / "optimizer.json").read_text()))
    ema = load_sharded(folder, "ema")
    return {"meta": meta, "model": load_sharded(folder, "model"), "optimizer": opt, "ema": ema or None}
