"""Checkpoint files for the zoo trainer, safetensors only.

Weights are written in shards of at most ``max_bytes`` so they fit the device tool's 16 MB per-file
return limit; the optimizer state is flattened into a safetensors file plus JSON, so nothing is ever
unpickled when resuming.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 15 * 1024 * 1024


def save_sharded(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = SHARD_BYTES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = folder / f"model-{i + 1:05d}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    return paths


def load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(folder).glob("model-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model-*.safetensors shards in {folder}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val) and val.dim() > 0:
                tensors[f"{pid}.{name}"] = val.contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = float(val)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"scalars": scalars, "param_groups": sd["param_groups"]}))


def load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> bool:
    """Restore optimizer state if present; returns False when training must start a fresh optimizer."""
    tfile, jfile = folder / "optimizer.safetensors", folder / "optimizer.json"
    if not (tfile.exists() and jfile.exists()):
        return False
    tensors, meta = load_file(str(tfile)), json.loads(jfile.read_text())
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for key, val in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(val)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return True
