"""Checkpoint files for the zoo trainer: the recovery trainer's safetensors pieces
(:mod:`snapopt.train.checkpoint`) in one folder per checkpoint, nothing ever unpickled.

Weights are cut into pieces under ``max_bytes`` so they fit the device tool's 16 MB per-file return
limit; the optimizer state is a safetensors file plus JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from snapopt.train.checkpoint import load_sharded as _load_pieces
from snapopt.train.checkpoint import optimizer_join, optimizer_split, save_sharded as _save_pieces

SHARD_BYTES = 15 * 1024 * 1024


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = SHARD_BYTES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    return [folder / f for f in _save_pieces(state, folder, "model", max_bytes / 1e6)]


def load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    state = _load_pieces(Path(folder), "model")
    if not state:
        raise FileNotFoundError(f"no model-*.safetensors shards in {folder}")
    return state


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    tensors, meta = optimizer_split(opt.state_dict())
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> bool:
    """Restore optimizer state if present; returns False when training must start a fresh optimizer."""
    tfile, jfile = folder / "optimizer.safetensors", folder / "optimizer.json"
    if not (tfile.exists() and jfile.exists()):
        return False
    opt.load_state_dict(optimizer_join(load_file(str(tfile)), json.loads(jfile.read_text())))
    return True
