"""Layer-wise least-squares reconstruction after channel pruning (He et al. 2017; ThiNet, Luo et al. 2017).

Pruning a layer's input channels leaves its weights tuned for inputs it no longer sees. Here every
Conv2d / Linear of the pruned student is refitted, in execution order, so that on real inputs its output
matches the teacher's same layer on the rows the student kept:

    min_W,b || [X_student, 1] [W; b] - Y_teacher[:, kept] ||² + ridge · mean(diag XᵀX) · ||W||²

where ``X_student`` is the layer's input inside the *pruned* network (every earlier layer already refitted,
so errors upstream are corrected, not compounded) and ``Y_teacher`` the teacher's output of that layer.
It is closed form (one Gram matrix per layer), so a decoder is refitted in seconds on a CPU, which
gradient distillation needs many minutes to match. One teacher pass records the targets at a seeded
subset of positions; one student pass refits each layer from a forward pre-hook as its input arrives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapopt.errors import UsageError


def refittable(m: nn.Module) -> bool:
    """Layers the least-squares fit handles: dense Conv2d (any kernel, stride, padding, dilation) and Linear."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


@torch.no_grad()
def reconstruct(student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, rows: dict[str, torch.Tensor] | None = None, *,
                layers: list[str] | None = None, positions: int = 1024, ridge: float = 1e-4, seed: int = 0,
                residual: bool = True) -> dict:
    """Refit ``student``'s layers in place to reproduce ``teacher``'s layer outputs on ``inputs``.

    ``rows``: layer path → the teacher output rows that layer kept (absent: all rows; paths are shared by
    student and teacher, as channel pruning keeps them). ``layers``: which layers to refit (default: every
    refittable layer whose input width changed). ``positions``: output positions (pixels or tokens) sampled per
    input. ``residual``: fit the last layer of each residual branch to the teacher block's output minus the
    student's skip (default), not to the teacher layer's own output. Returns per-layer relative residuals
    before and after the fit.
    """
    if positions < 1:
        raise UsageError(f"reconstruct: positions must be at least 1, got {positions}")
    if not ridge >= 0:
        raise UsageError(f"reconstruct: ridge must be >= 0, got {ridge}")
    if inputs.shape[0] < 1:
        raise UsageError("reconstruct: needs at least one input")
    rows = rows or {}
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    if layers is None:
        layers = [p for p, m in s_mods.items() if refittable(m) and p in t_mods and _in_width(m) != _in_width(t_mods[p])]
    for p in layers:
        if p not in s_mods or p not in t_mods:
            raise UsageError(f"reconstruct: layer '{p}' is not in both the student and the teacher")
        if not refittable(s_mods[p]):
            raise UsageError(f"reconstruct: layer '{p}' ({type(s_mods[p]).__name__}) is not a dense Conv2d or Linear")
    for p, r in rows.items():
        if p in layers and len(r) and int(r.max()) >= _out_width(t_mods[p]):
            raise UsageError(f"reconstruct: rows for '{p}' exceed the teacher layer's {_out_width(t_mods[p])} outputs")

    gen = torch.Generator().manual_seed(seed)
    picks: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    skips = _residual_branches(s_mods, layers) if residual else {}  # branch-ending layer -> its block
    block_targets: dict[str, torch.Tensor] = {}

    def kept(path, y):
        r = rows.get(path)
        return y if r is None else y[..., r.to(y.device)]

    def record(path):
        def hook(mod, args, out):
            flat = _flat_out(mod, out)  # (N, positions, C)
            if path not in picks:
                n = flat.shape[1]
                picks[path] = torch.randperm(n, generator=gen)[:positions].sort().values if n > positions else torch.arange(n)
            targets[path] = kept(path, flat[:, picks[path]]).double()
        return hook

    def record_block(layer):
        def hook(mod, args, out):  # runs after the branch's last layer recorded its picks
            block_targets[layer] = kept(layer, _flat_nchw(out)[:, picks[layer]]).double() * _skip_scale(mod)
        return hook

    handles = [t_mods[p].register_forward_hook(record(p)) for p in layers]
    handles += [t_mods[b].register_forward_hook(record_block(layer)) for layer, b in skips.items()]
    try:
        teacher(inputs)
    finally:
        for h in handles:
            h.remove()

    stats: dict[str, dict] = {}
    block_inputs: dict[str, torch.Tensor] = {}

    def fit(path, mod, x, y):
        feats = _features(mod, x, picks[path])  # (N * P, K), with a bias column where the layer has a bias
        y = y.reshape(-1, y.shape[-1]).to(feats.device)
        before = _rel(feats @ _weight_matrix(mod).to(feats), y)
        gram = feats.T @ feats
        k = gram.shape[0]
        n_w = k - (mod.bias is not None)
        lam = ridge * gram.diagonal()[:n_w].mean().clamp_min(1e-12)
        reg = torch.eye(k, dtype=gram.dtype, device=gram.device) * lam
        reg[n_w:, n_w:] = 0  # the bias is not shrunk
        sol = torch.linalg.solve(gram + reg, feats.T @ y)
        _set_weight_matrix(mod, sol)
        stats[path] = {"rel_err_before": before, "rel_err_after": _rel(feats @ sol, y), "samples": int(feats.shape[0])}

    def refit(path):
        def hook(mod, args):
            if path in stats:  # a shortcut already refitted by its block
                return
            y = targets[path]
            if path in skips:  # the branch supplies what the student's own skip path misses
                block = s_mods[skips[path]]
                skip = _skip(block, block_inputs[skips[path]])
                y = block_targets[path] - _flat_nchw(skip)[:, picks[path]].double()
            fit(path, mod, args[0], y)
        return hook

    def enter_block(bpath):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
            block_inputs[bpath] = x
            sc = f"{bpath}.conv_shortcut"
            if getattr(mod, "conv_shortcut", None) is not None and sc in layers and sc not in stats:
                fit(sc, mod.conv_shortcut, x, targets[sc])  # before the branch's conv2 needs the shortcut
        return hook

    handles = [s_mods[p].register_forward_pre_hook(refit(p)) for p in layers]
    handles += [s_mods[b].register_forward_pre_hook(enter_block(b), with_kwargs=True) for b in set(skips.values())]
    try:
        student(inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def _residual_branches(mods: dict[str, nn.Module], layers: list[str]) -> dict[str, str]:
    """Layers that end a residual branch (diffusers' ResnetBlock2D conv2, a residual Attention's to_out.0) →
    their block. Such a layer is fitted to the teacher block's output minus the student's own skip, so the
    residual stream's error is corrected where it arises instead of carried to the end."""
    out = {}
    for path, m in mods.items():
        kind = type(m).__name__
        if kind == "ResnetBlock2D" and not (getattr(m, "up", False) or getattr(m, "down", False)):
            branch = f"{path}.conv2"
        elif kind == "Attention" and getattr(m, "residual_connection", False):
            branch = f"{path}.to_out.0"
        else:
            continue
        if branch in layers:
            out[branch] = path
    return out


def _skip(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(block).__name__ == "ResnetBlock2D" and block.conv_shortcut is not None:
        return block.conv_shortcut(x)
    return x


def _skip_scale(block: nn.Module) -> float:
    """The block returns (skip + branch) / this."""
    return float(getattr(block, "output_scale_factor", None) or getattr(block, "rescale_output_factor", 1.0))


def _flat_nchw(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t.reshape(t.shape[0], -1, t.shape[-1])


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _flat_out(mod: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Layer output as (N, positions, channels): NCHW for convs, (N, ..., C) for linears."""
    if isinstance(mod, nn.Conv2d):
        return out.flatten(2).transpose(1, 2)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def _features(mod: nn.Module, x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The layer's inputs at the picked output positions, one row each, with a ones column for the bias."""
    if isinstance(mod, nn.Linear):
        flat = x.reshape(x.shape[0], -1, x.shape[-1])[:, pick]
    else:
        n, c, h, w = x.shape
        kh, kw = mod.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = mod.stride, mod.padding, mod.dilation
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        oy, ox = pick // ow, pick % ow
        xp = F.pad(x, (pw, pw, ph, ph))
        taps = [xp[:, :, oy * sh + i * dh, ox * sw + j * dw] for i in range(kh) for j in range(kw)]  # each (N, C, P)
        flat = torch.stack(taps, dim=2).reshape(n, c * kh * kw, -1).transpose(1, 2)  # (N, P, C*kh*kw), weight order
    flat = flat.reshape(-1, flat.shape[-1]).double()
    if mod.bias is None:
        return flat
    return torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)], dim=1)


def _weight_matrix(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1)
    if mod.bias is None:
        return w.T
    return torch.cat([w, mod.bias.detach()[:, None]], dim=1).T  # (K, C_out)


def _set_weight_matrix(mod: nn.Module, sol: torch.Tensor) -> None:
    w = sol if mod.bias is None else sol[:-1]
    mod.weight.data.copy_(w.T.reshape(mod.weight.shape).to(mod.weight))
    if mod.bias is not None:
        mod.bias.data.copy_(sol[-1].to(mod.bias))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
