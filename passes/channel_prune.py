"""``channel_prune``: dependency-aware structured channel pruning of a UNet or the VAE decoder (SnapFusion).

How it works, in four steps:

1. **Groups.** The component is captured with torch.export at a small shape and
   :func:`snapopt.ir.dependency.analyze` turns the FX graph into channel groups: channels coupled through
   residual adds, the time-embedding projection, GroupNorm and attention heads are one group; an up-block
   ResNet's concatenated input is two ranges, each pruned by its own group. The component's input and
   output channels (4 latent channels, 3 image channels, the sinusoidal timestep features, the text
   embedding) and anything the analysis does not understand are frozen.
2. **How many.** Each group keeps ``size × (1 − ratio)`` rows, rounded to a multiple of
   ``lcm(round_to, blocks)``, where blocks are its GroupNorm groups (``num_groups`` never changes, so
   channels-per-group stays integral and diffusers' config can still describe a uniform result) or its
   attention heads; GroupNorms over a skip concatenation force their group count on each source. Rounding
   goes to the nearest feasible count, and an exact tie (SD's 320 channels in 32 GroupNorm groups at 25%:
   224 or 256) goes to whichever keeps the running total on the requested ratio, so ties alternate instead
   of all rounding one way (how Torch-Pruning's ``round_to`` with GroupNorm misses the ratio).
3. **Which.** Rows are ranked by L1/L2 magnitude of every weight slice they own, or by first-order Taylor
   ``|w·∂L/∂w|`` on a seeded calibration batch, L = mean squared output (the MSE to the unpruned output has
   zero gradient at the unpruned weights, so it carries no signal). Within a GroupNorm group or a head an
   equal number is kept, so every kept channel stays in its original GroupNorm group. Structure-only (meta)
   models have no weights: the rows with the lowest indices are kept (criterion ``index``).
4. **Edit.** Parameters are sliced in place and every attribute diffusers reads is updated (Conv2d/Linear/
   GroupNorm/LayerNorm sizes, ``ResnetBlock2D`` in/out channels, ``Upsample2D``/``Downsample2D``
   ``channels``, ``Attention`` heads/inner_dim/scale, ``Transformer2DModel`` in_channels/inner_dim). The
   UNet's config is re-derived (it stays as it was when diffusers cannot express the result); the VAE's
   config is updated when one ``block_out_channels`` rebuilds the whole VAE.

Replay. Save/load replays structural passes on freshly initialised weights, where importance would choose
differently. So after choosing, ``run`` returns the options with what it kept filled in as ``keep`` — group
name → kept row indices as compact ranges (``"0-3,8-11"``) — as ``PassResult.replay_options``, which the
pass manager logs.
Run with ``keep``, the pass skips ranking and reproduces exactly that structure.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from snapopt.capture import capture
from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.core.pass_base import MAX_LIST, BlockPath
from snapopt.errors import UsageError
from snapopt.ir.dependency import ChannelGroup, DependencyGraph, analyze, lcm
from snapopt.lowering.interfaces import Shapes, component_io
from snapopt.models.unet_config import sync_unet_config

#: parameter dims that are the model's own interface (latent in, image/noise out): never pruned
_PROTECTED = {("conv_in.weight", 1), ("conv_out.weight", 0), ("decoder.conv_in.weight", 1), ("decoder.conv_out.weight", 0),
              ("post_quant_conv.weight", 0), ("encoder.conv_in.weight", 1), ("encoder.conv_out.weight", 0),
              ("quant_conv.weight", 0)}


class ReconstructOptions(BaseModel):
    """Least-squares refit of every layer whose inputs were pruned (snapopt.train.reconstruct)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # each latent is a teacher and a student forward at the recipe's size, held in memory at once
    latents: int = Field(64, ge=1, le=1024, description="calibration latents (decoded once by the teacher)")
    source: Literal["zoo", "random", "teacher"] = Field("zoo", description=(
        "where the latents come from: encoded zoo scenes, N(0, 1), or teacher samples (see train data.source)"))
    positions: int = Field(1024, ge=1, le=1 << 20, description="output positions sampled per latent and layer")
    ridge: float = Field(1e-4, ge=0, le=1e3, allow_inf_nan=False, description="ridge, relative to the mean input energy")
    residual: bool = Field(True, description=(
        "fit each residual branch's last layer to the teacher block's output minus the student's skip"))
    seed: int = Field(1, description="calibration seed (held-out latents for the reported PSNR use seed + 1)")


class ChannelPruneOptions(ComponentOptions):
    ratio: float = Field(0.5, ge=0.0, lt=1.0, allow_inf_nan=False, description="fraction of each group's channels to remove")
    per_module: dict[BlockPath, float] = Field(default_factory=dict, max_length=MAX_LIST, description=(
        "ratio per module path, e.g. {'down_blocks.0': 0.25}; a group takes the most specific path one of its producing layers sits under"))
    # bounded: a multiple above any layer's width (the widest SD layer has 1280 channels x 4 for GEGLU) prunes nothing sane
    round_to: int = Field(1, ge=1, le=8192, description="keep a multiple of this many channels (combined with GroupNorm groups and heads)")
    criterion: Literal["l1", "l2", "taylor"] = Field("l1", description="importance: weight magnitude or first-order Taylor")
    heads: Literal["dim", "whole"] = Field("dim", description=(
        "attention: shrink every head's dim equally (keeps the head count, as diffusers' config assumes) or drop whole heads"))
    groups: Literal["dim", "whole"] = Field("dim", description=(
        "GroupNorm: keep every group with fewer channels (num_groups unchanged, as diffusers' config assumes) or "
        "drop whole groups and lower num_groups, so each kept group normalises exactly the channels it did"))
    # each batch is a forward+backward of the component: 64 is minutes at full size, 1e30 never ends
    calibration_batches: int = Field(1, ge=1, le=64, description="seeded batches for the Taylor criterion")
    with_encoder: bool = Field(False, description=(
        "vae_decoder: prune the VAE encoder at the same ratios too, so AutoencoderKL's one block_out_channels "
        "describes both halves and save_pretrained holds the result"))
    reconstruct: ReconstructOptions | None = Field(None, description=(
        "vae_decoder: refit the pruned layers by least squares to the teacher's layer outputs on real latents "
        "(He et al. 2017), e.g. {latents: 64}; closed form, seconds on a CPU"))
    keep: dict[str, str] | None = Field(None, description=(
        "resolved structure (group -> kept rows as ranges); written by the pass so save/load can replay it"))

    @field_validator("component")
    @classmethod
    def _component(cls, v: str) -> str:
        if v not in ("unet", "vae_decoder"):
            raise ValueError(f"channel_prune works on 'unet' or 'vae_decoder', not '{v}'")
        return v

    @field_validator("per_module")
    @classmethod
    def _ratios(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: r for k, r in v.items() if not 0.0 <= r < 1.0}
        if bad:
            k, r = next(iter(bad.items()))
            raise ValueError(f"per_module ratio for '{k}' is {r}; it must be in [0, 1)")
        return v


class ChannelPrune(Pass):
    """Structured channel pruning over dependency groups (residuals, skips, GroupNorm, heads), keeping a diffusers module."""

    name = "channel_prune"
    Options = ChannelPruneOptions
    exact = False
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        opts = self.options
        root = program.component(opts.component)
        if opts.with_encoder and opts.component != "vae_decoder":
            raise UsageError("channel_prune: with_encoder applies to component 'vae_decoder' only")
        if opts.reconstruct is not None and opts.component != "vae_decoder":
            raise UsageError("channel_prune: reconstruct applies to component 'vae_decoder' only (it needs decoder latents)")
        if opts.reconstruct is not None and program.structure_only:
            raise UsageError("channel_prune: reconstruct needs weights; this model is structure-only")
        modules = dict(root.named_modules())
        if opts.with_encoder:
            modules.update(program.component("vae_encoder").named_modules())
        for path in opts.per_module:
            if path not in modules:
                raise UsageError(f"channel_prune: component '{opts.component}' has no module '{path}' (per_module)")
        before = _count(root)
        parts = [opts.component] + (["vae_encoder"] if opts.with_encoder else [])
        plans = [_plan(program, part, opts, ctx) for part in parts]  # choose everything, then edit
        keep = {name: rows for _, _, k, _ in plans for name, rows in k.items()}
        unknown = sorted(set(opts.keep or {}) - set(keep))
        if unknown:
            raise UsageError(f"channel_prune: keep names group '{unknown[0]}', which this model does not have")
        calib = _calibration(program, opts.reconstruct) if opts.reconstruct is not None else None
        groups, frozen, unhandled = [], [], {}
        for part, (dg, part_groups, part_keep, criterion) in zip(parts, plans):
            _apply(program.component(part), part_groups, part_keep, dg, opts)
            groups += part_groups
            frozen += dg.frozen + [x.name for x in dg.groups if _protected(x)]
            unhandled.update(dg.unhandled)
        _sync_config(program, opts.component)
        after = _count(root)
        # the replay rebuilds structure only (weights are loaded after it): no reconstruction
        resolved = opts.model_copy(update={"keep": {g.name: _ranges(keep[g.name]) for g in groups}, "reconstruct": None})
        report = [_group_row(g, keep[g.name], _ratio_for(g, opts)) for g in groups]
        total = sum(r["channels"] for r in report)
        kept = sum(r["kept"] for r in report)
        requested = sum(r["channels"] * r["requested"] for r in report) / max(total, 1)
        stats = {
            "criterion": criterion,
            "requested_ratio": round(requested, 4),
            "achieved_ratio": round(1 - kept / max(total, 1), 4),
            "params_before": before, "params_after": after,
            "groups": report, "frozen_groups": frozen, "unhandled_ops": unhandled,
        }
        if calib is not None:
            stats["reconstruct"] = _reconstruct(root, calib, plans[0][1], keep, opts.reconstruct)
        if opts.component == "vae_decoder":
            cfg = vae_config_for(program.vae, decoder_only=True)
            stats["decoder_block_out_channels"] = list(cfg["block_out_channels"]) if cfg else None
            stats["vae_config_expresses"] = vae_config_for(program.vae) is not None
        return PassResult(program, modified=kept < total, stats=stats, replay_options=resolved.model_dump(mode="json"))


def _plan(program, component: str, opts: "ChannelPruneOptions", ctx: PassContext):
    """Analyse and rank one component, and choose what it keeps (nothing is edited yet)."""
    dg = dependency_groups(program, component)
    groups = [g for g in dg.groups if not _protected(g)]
    if opts.keep is not None:
        return dg, groups, _keep_from_options(opts.keep, groups), "replayed"
    criterion = opts.criterion if not program.structure_only else "index"
    root = program.component(component)
    scores = _importance(program, component, root, groups, criterion, ctx, opts.calibration_batches)
    return dg, groups, _choose(groups, scores, opts), criterion


# ---- analysis -------------------------------------------------------------------------------------------
def dependency_groups(program, component: str) -> DependencyGraph:
    """Capture ``component`` at a small fixed shape (the groups do not depend on resolution) and analyse it."""
    downs = len(getattr(program.unet, "down_blocks", [])) if component == "unet" else 0
    shapes = Shapes(resolution=max(8, 2 ** downs) * program.vae_scale_factor, batch=1)
    _, ep = capture(program, component, shapes)
    return analyze(ep, component + ".")


def _protected(g: ChannelGroup) -> bool:
    return any(k in _PROTECTED for k in g.members)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _ratio_for(g: ChannelGroup, opts: ChannelPruneOptions) -> float:
    """The most specific ``per_module`` path one of the group's *producers* (the convs/linears whose outputs
    the channels are) sits under, else the global ratio. Consumers do not count: every ResNet reads the
    time embedding, but pruning ``down_blocks.1`` should not narrow it."""
    best, ratio = -1, opts.ratio
    for path, r in opts.per_module.items():
        if len(path) > best and any(p == path or p.startswith(path + ".") for p in g.producers):
            best, ratio = len(path), r
    return ratio


# ---- importance -----------------------------------------------------------------------------------------
def _importance(program, component: str, root: nn.Module, groups: list[ChannelGroup], criterion: str,
                ctx: PassContext, batches: int = 1) -> dict[str, np.ndarray]:
    """One score per row of every group: the sum over the weight slices the row owns."""
    params = dict(root.named_parameters())
    if criterion == "index":
        return {g.name: -np.arange(g.size, dtype=np.float64) for g in groups}
    grads = _taylor_grads(program, component, root, ctx, batches) if criterion == "taylor" else {}
    cache: dict[tuple[str, int], np.ndarray] = {}

    def per_index(name: str, dim: int) -> np.ndarray:
        if (name, dim) not in cache:
            w = params[name].detach().float()
            if criterion == "taylor":
                w = (w * grads[name]).abs()
            v = w.abs() if criterion in ("l1", "taylor") else w.pow(2)
            other = [d for d in range(v.dim()) if d != dim]
            cache[(name, dim)] = (v.sum(dim=other) if other else v).double().numpy()
        return cache[(name, dim)]

    out = {}
    for g in groups:
        score = np.zeros(g.size)
        for (name, dim), idx in g.members.items():
            score += per_index(name, dim)[idx].sum(axis=1)
        out[g.name] = np.sqrt(score) if criterion == "l2" else score
    return out


def _taylor_grads(program, component: str, root: nn.Module, ctx: PassContext, batches: int) -> dict[str, torch.Tensor]:
    """Accumulated gradients of mean(output²) on seeded inputs at the recipe's resolution, batch 1 (CFG's two
    halves would only repeat the same sample)."""
    shapes = Shapes(resolution=ctx.shapes.resolution if ctx.shapes else 8 * program.vae_scale_factor, batch=1)
    named = dict(root.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    for p in named.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        for i in range(batches):
            io = component_io(program, component, shapes, seed=ctx.seed + i)
            out = io.module(*io.example_inputs)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
        return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach() for n, p in named.items()}
    finally:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(flags[n])


# ---- how many and which ---------------------------------------------------------------------------------
def _unit(g: ChannelGroup, opts: ChannelPruneOptions) -> int:
    """Kept rows come in multiples of this: round_to, the GroupNorm groups/heads, concatenation GroupNorms."""
    if _whole(g, opts):
        return lcm(g.size // g.n_blocks, g.multiple)
    return lcm(opts.round_to, g.n_blocks if g.structure else 1, g.multiple)


def _choose(groups: list[ChannelGroup], scores: dict[str, np.ndarray], opts: ChannelPruneOptions) -> dict[str, np.ndarray]:
    """Kept rows per group: balanced rounding of the counts, then the best-scoring rows per block."""
    keep, target_total, kept_total = {}, 0.0, 0
    for g in groups:
        unit = _unit(g, opts)
        target = g.size * (1.0 - _ratio_for(g, opts))
        target_total += target
        if unit >= g.size:
            count = g.size  # no feasible smaller count (reported as achieved 0)
        else:
            lo = max(unit, int(target // unit) * unit)
            hi = lo + unit if lo + unit <= g.size else g.size  # keeping everything is always feasible
            # the nearest feasible count; an exact tie goes to whichever keeps the running total on target
            count = min((lo, hi), key=lambda c: (round(abs(c - target), 6), abs(kept_total + c - target_total)))
        kept_total += count
        keep[g.name] = _select(g, scores[g.name], count, whole_blocks=_whole(g, opts))
    return keep


def _whole(g: ChannelGroup, opts: ChannelPruneOptions) -> bool:
    """Whether this group drops whole blocks: whole heads, or whole GroupNorm groups where every GroupNorm
    on the group has the same groups (a coarser GroupNorm would be left with partial groups) and no
    GroupNorm over a concatenation reads it (that one keeps its num_groups)."""
    if g.structure == "heads":
        return opts.heads == "whole"
    return g.structure == "groupnorm" and opts.groups == "whole" and g.multiple == 1 and g.uniform_blocks


def _select(g: ChannelGroup, score: np.ndarray, count: int, *, whole_blocks: bool) -> np.ndarray:
    """The ``count`` best rows, an equal number per block (or whole blocks); ties go to the lower index."""
    if count >= g.size:
        return np.arange(g.size)
    if not g.structure:
        order = sorted(range(g.size), key=lambda i: (-score[i], i))
        return np.sort(np.array(order[:count]))
    nb = g.n_blocks
    if whole_blocks:
        block_score = [score[g.block_of == b].sum() for b in range(nb)]
        best = sorted(range(nb), key=lambda b: (-block_score[b], b))[: count // (g.size // nb)]
        return np.sort(np.flatnonzero(np.isin(g.block_of, best)))
    per = count // nb
    chosen = []
    for b in range(nb):
        rows = np.flatnonzero(g.block_of == b)
        chosen += sorted(rows.tolist(), key=lambda i: (-score[i], i))[:per]
    return np.sort(np.array(chosen))


def _keep_from_options(spec: dict[str, str], groups: list[ChannelGroup]) -> dict[str, np.ndarray]:
    out = {}
    for g in groups:
        rows = _parse_ranges(spec.get(g.name, f"0-{g.size - 1}"), g.name)
        if len(rows) == 0 or rows.max() >= g.size:
            raise UsageError(f"channel_prune: keep['{g.name}'] does not fit the group's {g.size} channels")
        out[g.name] = rows
    return out


def _ranges(rows: np.ndarray) -> str:
    """``[0,1,2,3,8]`` -> ``"0-3,8"``: compact enough to log for SD-v1.5's ~100 groups."""
    parts, rows = [], sorted(int(r) for r in rows)
    start = prev = rows[0]
    for r in rows[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _parse_ranges(text: str, name: str) -> np.ndarray:
    try:
        rows = []
        for part in filter(None, text.split(",")):
            a, _, b = part.partition("-")
            rows += range(int(a), int(b or a) + 1)
        return np.array(sorted(set(rows)), dtype=np.int64)
    except ValueError:
        raise UsageError(f"channel_prune: keep['{name}'] = '{text}' is not a list of ranges like '0-3,8'") from None


def _group_row(g: ChannelGroup, kept: np.ndarray, requested: float) -> dict:
    return {"group": g.name, "channels": g.size, "kept": int(len(kept)), "requested": requested,
            "achieved": round(1 - len(kept) / g.size, 4), "structure": g.structure, "blocks": g.n_blocks}


# ---- least-squares reconstruction -------------------------------------------------------------------------
def _calibration(program, o: ReconstructOptions) -> dict:
    """Before any edit: a copy of the teacher decoder, calibration latents and held-out latents (unscaled, as
    the decoder reads them)."""
    from snapopt.train.data import LatentSource
    from snapopt.train.options import DataOptions

    scale = float(program.vae.config.scaling_factor)
    dev = next(program.vae.parameters()).device

    def latents(n: int, seed: int) -> torch.Tensor:
        src = LatentSource(program, DataOptions(source=o.source, pool=n), seed=seed, device=dev)
        x0 = src.pool_x0[:n] if src.pool_x0 is not None else src.batch(0, n).x0
        return x0 / scale

    return {"teacher": copy.deepcopy(program.component("vae_decoder")).eval(),
            "latents": latents(o.latents, o.seed), "held_out": latents(8, o.seed + 1)}


def _reconstruct(root: nn.Module, calib: dict, groups: list[ChannelGroup], keep: dict[str, np.ndarray],
                 o: ReconstructOptions) -> dict:
    """Refit the pruned decoder's layers to the teacher's; PSNR vs the teacher on held-out latents before/after."""
    from snapopt.train.decoder import psnr
    from snapopt.train.reconstruct import reconstruct

    teacher, held = calib["teacher"], calib["held_out"]
    with torch.no_grad():
        ref = teacher(held)
        before = psnr(root(held), ref)
    rows = {}
    for (name, dim), drop in _removed(groups, keep).items():
        if dim == 0 and name.endswith(".weight") and drop:
            size = teacher.get_parameter(name).shape[0]
            rows[name[: -len(".weight")]] = torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long)
    layers = reconstruct(root, teacher, calib["latents"], rows, positions=o.positions, ridge=o.ridge, seed=o.seed,
                         residual=o.residual)
    with torch.no_grad():
        after = psnr(root(held), ref)
    return {"layers": len(layers), "latents": int(calib["latents"].shape[0]), "psnr_before_db": round(before, 2),
            "psnr_after_db": round(after, 2),
            "worst_layer_rel_err": round(max((v["rel_err_after"] for v in layers.values()), default=0.0), 4)}


# ---- edit the modules -----------------------------------------------------------------------------------
def _removed(groups: list[ChannelGroup], keep: dict[str, np.ndarray]) -> dict[tuple[str, int], set[int]]:
    """(parameter, dim) → the rows pruning removes from it."""
    removed: dict[tuple[str, int], set[int]] = {}
    for g in groups:
        drop = np.setdiff1d(np.arange(g.size), keep[g.name])
        for key, idx in g.members.items():
            removed.setdefault(key, set()).update(idx[drop].ravel().tolist())
    return removed


def _apply(root: nn.Module, groups: list[ChannelGroup], keep: dict[str, np.ndarray], dg: DependencyGraph,
           opts: ChannelPruneOptions | None = None) -> None:
    for (name, dim), rows in _removed(groups, keep).items():
        if not rows:
            continue
        owner_name, attr = name.rsplit(".", 1)
        owner = root.get_submodule(owner_name)
        p = getattr(owner, attr)
        kept = torch.tensor([i for i in range(p.shape[dim]) if i not in rows], dtype=torch.long, device=p.device)
        new = nn.Parameter(p.detach().index_select(dim, kept).clone(), requires_grad=p.requires_grad)
        setattr(owner, attr, new)
    _sync_attributes(root, keep, groups, dg, _groups_left(keep, groups, opts))


def _groups_left(keep: dict[str, np.ndarray], groups: list[ChannelGroup], opts: ChannelPruneOptions | None) -> dict[str, int]:
    """GroupNorm module -> num_groups after whole-group pruning: the blocks with a kept row."""
    out = {}
    for g in groups:
        if opts is not None and g.structure == "groupnorm" and _whole(g, opts):
            left = len(set(g.block_of[keep[g.name]].tolist()))
            for module in g.modules:
                out[module] = left
    return out


def _sync_attributes(root: nn.Module, keep: dict[str, np.ndarray], groups: list[ChannelGroup], dg: DependencyGraph,
                     groups_left: dict[str, int] | None = None) -> None:
    """Make every size attribute diffusers (and torch) reads agree with the new weights."""
    from diffusers.models.attention_processor import Attention

    heads_left = _heads_left(keep, groups, dg)
    groups_left = groups_left or {}
    for path, m in root.named_modules():
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
            m.num_groups = groups_left.get(path, m.num_groups)
            if m.num_channels % m.num_groups:
                raise UsageError(f"channel_prune: GroupNorm '{path}' would keep {m.num_channels} channels, "
                                 f"not divisible by its {m.num_groups} groups; use a round_to that is a multiple of it")
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = (m.weight.shape[0],)
    for path, m in root.named_modules():
        kind = type(m).__name__
        if kind == "ResnetBlock2D":
            m.in_channels, m.out_channels = m.conv1.in_channels, m.conv2.out_channels
        elif kind in ("Upsample2D", "Downsample2D"):
            conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
            if isinstance(conv, nn.Conv2d):
                m.channels, m.out_channels = conv.in_channels, conv.out_channels
        elif isinstance(m, Attention):
            _sync_attention(m, heads_left.get(path, m.heads))
        elif kind == "Transformer2DModel":
            pin = m.proj_in
            m.in_channels = pin.in_channels if isinstance(pin, nn.Conv2d) else pin.in_features
            m.inner_dim = pin.out_channels if isinstance(pin, nn.Conv2d) else pin.out_features
            m.out_channels = m.in_channels
            blocks = list(m.transformer_blocks)
            ref = _block_attention(blocks[0]) if blocks else None
            if ref is not None:
                m.num_attention_heads = ref.heads
                m.attention_head_dim = ref.inner_dim // ref.heads
        elif kind == "BasicTransformerBlock":
            ref = _block_attention(m)
            if ref is not None:
                m.dim = ref.query_dim
                m.num_attention_heads = ref.heads
                m.attention_head_dim = ref.inner_dim // ref.heads


def _block_attention(block):
    """The attention whose width describes a transformer block: its self-attention, or its cross-attention where
    remove_self_attention left a NullAttention in attn1."""
    from diffusers.models.attention_processor import Attention

    for name in ("attn1", "attn2"):
        a = getattr(block, name, None)
        if isinstance(a, Attention):
            return a
    return None


def _heads_left(keep: dict[str, np.ndarray], groups: list[ChannelGroup], dg: DependencyGraph) -> dict[str, int]:
    """Heads each attention keeps: blocks of its head group with at least one kept row."""
    out = {}
    for g in groups:
        if g.structure == "heads":
            left = len(set(g.block_of[keep[g.name]].tolist()))
            for module in g.modules:
                out[module] = left
    return out


def _sync_attention(attn: nn.Module, heads: int) -> None:
    attn.heads = attn.sliceable_head_dim = heads
    attn.inner_dim = attn.to_q.out_features
    attn.inner_kv_dim = attn.to_k.out_features
    attn.query_dim = attn.to_q.in_features
    attn.cross_attention_dim = attn.to_k.in_features
    attn.out_dim = attn.to_out[0].out_features
    if attn.scale_qk:
        attn.scale = (attn.inner_dim // heads) ** -0.5  # what diffusers' config would build; SDPA uses it too
    if attn.group_norm is not None:
        attn.group_norm.num_channels = attn.group_norm.weight.shape[0]


# ---- configs ----------------------------------------------------------------------------------------------
def _sync_config(program, component: str) -> None:
    """Keep each diffusers config truthful where it can describe the pruned structure."""
    if component == "unet":
        sync_unet_config(program.unet)
        return
    cfg = vae_config_for(program.vae)
    if cfg is not None:
        program.vae.register_to_config(block_out_channels=cfg["block_out_channels"], norm_num_groups=cfg["norm_num_groups"])


def decoder_block_out_channels(vae: nn.Module) -> tuple[int, ...]:
    ups = list(vae.decoder.up_blocks)
    return tuple(ups[len(ups) - 1 - i].resnets[-1].out_channels for i in range(len(ups)))


def vae_config_for(vae: nn.Module, *, decoder_only: bool = False) -> dict | None:
    """The AutoencoderKL config whose ``block_out_channels`` rebuilds this VAE's decoder (``decoder_only``)
    or the whole VAE exactly, proved on the meta device; ``None`` if none does."""
    from diffusers import AutoencoderKL

    cfg = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    cfg["block_out_channels"] = decoder_block_out_channels(vae)
    cfg["norm_num_groups"] = vae.decoder.conv_norm_out.num_groups  # lowered by groups: whole
    try:
        with torch.device("meta"):
            probe = AutoencoderKL.from_config(cfg)
    except Exception:
        return None

    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in m.state_dict().items()
                if not decoder_only or k.startswith(("decoder.", "post_quant_conv."))}

    def groups(m: nn.Module) -> dict[str, int]:
        return {k: g.num_groups for k, g in m.named_modules() if isinstance(g, nn.GroupNorm)
                and (not decoder_only or k.startswith(("decoder.", "post_quant_conv.")))}

    return cfg if shapes(probe) == shapes(vae) and groups(probe) == groups(vae) else None
