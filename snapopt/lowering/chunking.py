"""Split a UNet into ``UnetChunk1``/``UnetChunk2`` when its weights exceed a target's per-model limit.

Apple's Swift ``Unet`` runs chunks as a pipeline (``ManagedMLModel.swift``): chunk 2 receives chunk 1's
outputs merged with the original inputs, so the cut tensors only need matching names. snapopt cuts between
the UNet's stages (down blocks, mid block, up blocks) at the boundary that best halves the weights, which
works for pruned UNets too; the cut carries the time embedding, the hidden state and the skip connections
the remaining up blocks still need. Chunk 1 keeps the ``sample`` input Swift reads the latent shape from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from snapopt.lowering.interfaces import ComponentIO, Shapes, component_io
from snapopt.models.pipeline import Pipeline

CHUNK_NAMES = ("UnetChunk1", "UnetChunk2")


def _stages(unet) -> list[tuple[str, nn.Module]]:
    stages = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block))
    stages += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return stages


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def choose_cut(unet) -> int:
    """Index of the first stage of chunk 2: the stage boundary that best halves the parameter count."""
    stages = _stages(unet)
    total = _params(unet)
    before = _params(unet.conv_in) + _params(unet.time_embedding)
    best, best_gap = 1, float("inf")
    for k in range(len(stages)):
        before += _params(stages[k][1])
        gap = abs(before - total / 2)
        if 0 < k + 1 < len(stages) and gap < best_gap:
            best, best_gap = k + 1, gap
    return best


def supports_chunking(unet) -> str | None:
    """None when :class:`UnetChunk1`/:class:`UnetChunk2` reproduce ``unet``'s forward, else why not."""
    cfg = unet.config
    for key, ok in (("addition_embed_type", None), ("class_embed_type", None), ("encoder_hid_dim_type", None),
                    ("center_input_sample", False)):
        if getattr(cfg, key, ok) != ok:
            return f"UNet config {key}={getattr(cfg, key)!r} is not handled by the chunker"
    if getattr(unet, "time_embed_act", None) is not None:
        return "UNet time_embed_act is not handled by the chunker"
    return None


class UnetChunk1(nn.Module):
    """conv_in, time embedding and stages ``[0, cut)``: outputs the time embedding, the hidden state and the
    skip tensors chunk 2 still needs, in order."""

    def __init__(self, unet, cut: int):
        super().__init__()
        self.unet, self.cut = unet, cut

    def forward(self, sample, timestep, encoder_hidden_states):
        u = self.unet
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)
        emb = u.time_embedding(t_emb)
        h = u.conv_in(sample)
        skips: tuple = (h,)
        for _, block in _stages(u)[: self.cut]:
            h, skips = _stage(u, block, h, emb, context, skips)
        return (emb, h, *skips)


class UnetChunk2(nn.Module):
    """Stages ``[cut, end)`` and the output head; inputs are chunk 1's outputs plus ``encoder_hidden_states``."""

    def __init__(self, unet, cut: int, n_skips: int):
        super().__init__()
        self.unet, self.cut, self.n_skips = unet, cut, n_skips

    def forward(self, emb, h, *rest):
        u = self.unet
        skips, encoder_hidden_states = tuple(rest[: self.n_skips]), rest[self.n_skips]
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        for _, block in _stages(u)[self.cut:]:
            h, skips = _stage(u, block, h, emb, context, skips)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)


def _stage(u, block, h, emb, context, skips):
    """Run one stage as diffusers' forward does (fixed, even latent sizes: no forwarded upsample size)."""
    cross = getattr(block, "has_cross_attention", False)
    if block is u.mid_block:
        h = block(h, emb, encoder_hidden_states=context) if cross else block(h, emb)
        return h, skips
    if any(block is b for b in u.down_blocks):
        if cross:
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        return h, skips + tuple(res)
    n = len(block.resnets)
    res, skips = skips[-n:], skips[:-n]
    if cross:
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
    else:
        h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    return h, skips


@dataclass
class ChunkPlan:
    cut: int
    stage: str
    io: tuple[ComponentIO, ComponentIO]
    params: tuple[int, int]


def plan_chunks(pipe: Pipeline, shapes: Shapes, *, cut: int | None = None, io_fn=component_io) -> ChunkPlan:
    """Both chunks wrapped as :class:`ComponentIO` with matching cut names (``cut_emb``, ``cut_hidden``,
    ``cut_skip_<i>``), example inputs computed by running chunk 1."""
    unet = pipe.unet
    why = supports_chunking(unet)
    if why:
        from snapopt.errors import LoweringError

        raise LoweringError(f"cannot chunk the UNet: {why}")
    full = io_fn(pipe, "unet", shapes)
    cut = choose_cut(unet) if cut is None else cut
    c1 = UnetChunk1(unet, cut).eval()
    with torch.no_grad():
        outs = c1(*full.example_inputs)
    n_skips = len(outs) - 2
    cut_names = ["cut_emb", "cut_hidden"] + [f"cut_skip_{i}" for i in range(n_skips)]
    io1 = ComponentIO("unet", c1, full.example_inputs, list(full.input_names), cut_names)
    c2 = UnetChunk2(unet, cut, n_skips).eval()
    io2 = ComponentIO("unet", c2, (*[o.detach() for o in outs], full.example_inputs[2]),
                      cut_names + ["encoder_hidden_states"], list(full.output_names))
    stages = _stages(unet)
    p1 = _params(unet.conv_in) + _params(unet.time_embedding) + sum(_params(b) for _, b in stages[:cut])
    return ChunkPlan(cut, stages[cut][0], (io1, io2), (p1, _params(unet) - p1))


def compose_error(pipe: Pipeline, plan: ChunkPlan, shapes: Shapes) -> float:
    """‖chunk2(chunk1(x)) − unet(x)‖/‖unet(x)‖ in torch on the interface's example inputs."""
    full = component_io(pipe, "unet", shapes)
    io1, io2 = plan.io
    with torch.no_grad():
        ref = full.module(*full.example_inputs)
        mid = io1.module(*full.example_inputs)
        got = io2.module(*mid, full.example_inputs[2])
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def weight_bytes(module: nn.Module, bits: int) -> int:
    """Bytes the weights take in a package at ``bits`` per weight (16: fp16)."""
    return _params(module) * bits // 8


def onnx_compose_error(pipe: Pipeline, shapes: Shapes, onnx_dir) -> float:
    """Run ``UnetChunk1.onnx`` then ``UnetChunk2.onnx`` in ONNX Runtime the way Swift chains them (chunk 1's
    outputs merged with the original inputs, by name) and compare with the torch UNet."""
    import numpy as np
    import onnxruntime as ort

    full = component_io(pipe, "unet", shapes)
    feeds = {n: t.numpy() for n, t in zip(full.input_names, full.example_inputs)}
    s1 = ort.InferenceSession(str(onnx_dir / f"{CHUNK_NAMES[0]}.onnx"), providers=["CPUExecutionProvider"])
    s2 = ort.InferenceSession(str(onnx_dir / f"{CHUNK_NAMES[1]}.onnx"), providers=["CPUExecutionProvider"])
    out1 = dict(zip([o.name for o in s1.get_outputs()], s1.run(None, {i.name: feeds[i.name] for i in s1.get_inputs()})))
    merged = {**feeds, **out1}
    got = s2.run(None, {i.name: merged[i.name] for i in s2.get_inputs()})[0]
    with torch.no_grad():
        ref = full.module(*full.example_inputs).numpy()
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-12))
