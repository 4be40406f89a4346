"""``remove_blocks``: remove named blocks, keeping every surviving weight (how BK-SDM builds its students).

Names are diffusers module paths of the component as it is *before* the pass:

* ``down_blocks.1.attentions.0``, ``up_blocks.2.resnets.1`` – a ResNet or attention block
* ``mid_block`` or ``mid_block.attentions.0`` – the whole mid block or a part of it
* ``down_blocks.3`` / ``up_blocks.0`` – a whole stage (name the mirrored up stage too)
* ``down_blocks.2.downsamplers`` / ``up_blocks.1.upsamplers`` – a sampler
* ``stage:3`` – shorthand: down stage 3, its mirrored up stage, and the sampler that fed it

A ResNet and attention pair removed from a down/up block leaves the block, and with it one skip connection;
the pass checks that skip connections still pair up in channels and resolution and names the first one
that does not. A lone attention (or a channel-preserving ResNet) becomes a parameter-free
:class:`~snapopt.models.blocks.SkippedBlock`.
"""

from __future__ import annotations

import re

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.core.pass_base import MAX_LIST, BlockPath
from snapopt.errors import PreconditionError, UsageError
from snapopt.models.blocks import SkippedBlock
from snapopt.models.unet_config import sync_unet_config


class RemoveBlocksOptions(ComponentOptions):
    component: Literal["unet", "vae_decoder", "vae_encoder", "text_encoder"] = "unet"
    blocks: list[BlockPath] = Field(min_length=1, max_length=MAX_LIST, description="module paths of the blocks to remove (see `snapopt inspect`)")
    keep_skips: bool = Field(False, description="never delete a down/up layer (and its skip connection): skip blocks in place instead")

    @field_validator("blocks")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"blocks listed twice: {', '.join(dup)}")
        return v

    @field_validator("blocks")
    @classmethod
    def _stages_are_unet(cls, v: list[str], info: ValidationInfo) -> list[str]:
        stage = next((b for b in v if b.startswith("stage:")), None)
        component = info.data.get("component", "unet")
        if stage is not None and component != "unet":
            raise ValueError(f"'{stage}' names a UNet stage; component is '{component}' (name its blocks instead)")
        return v


_LAYER = re.compile(r"^(?P<parent>.+)\.(?P<kind>resnets|attentions)\.(?P<idx>\d+)$")


class RemoveBlocks(Pass):
    """Remove named ResNet/attention blocks, mid-block parts, samplers or whole stages, keeping surviving weights."""

    name = "remove_blocks"
    Options = RemoveBlocksOptions
    exact = False
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        component = self.options.component
        root = program.component(component)
        names = _expand(self.options.blocks, root)
        modules = dict(root.named_modules())
        before = sum(p.numel() for p in root.parameters())

        stages: list[str] = []
        samplers: list[str] = []
        layers: dict[str, dict[int, set[str]]] = {}
        mid = False
        for name in names:
            if name not in modules:
                raise UsageError(f"remove_blocks: component '{component}' has no block '{name}'")
            if name in ("mid_block",):
                mid = True
            elif re.fullmatch(r"(decoder\.)?(down_blocks|up_blocks)\.\d+", name):
                stages.append(name)
            elif re.search(r"\.(downsamplers|upsamplers)(\.0)?$", name):
                samplers.append(re.sub(r"\.0$", "", name))
            elif (m := _LAYER.match(name)):
                layers.setdefault(m["parent"], {}).setdefault(int(m["idx"]), set()).add(m["kind"])
            elif (m := re.fullmatch(r"(?P<parent>.+\.layers)\.(?P<idx>\d+)", name)):  # CLIP encoder layers
                layers.setdefault(m["parent"], {}).setdefault(int(m["idx"]), set()).add("layers")
            else:
                raise UsageError(f"remove_blocks: '{name}' is not a removable block (ResNet, attention, sampler, stage or mid_block)")

        # Remove layers first (indices are those of the original model), then samplers, mid, stages.
        removed_layers, skipped = [], []
        for parent_name, by_idx in layers.items():
            parent = modules[parent_name]
            for idx in sorted(by_idx, reverse=True):
                kinds = by_idx[idx]
                removed, skip = _remove_layer(parent, parent_name, idx, kinds, self.options.keep_skips)
                removed_layers += removed
                skipped += skip
        for name in samplers:
            owner_name, attr = name.rsplit(".", 1)
            setattr(modules[owner_name], attr, None)
        if mid:
            if not hasattr(root, "mid_block") or component != "unet":
                raise UsageError("remove_blocks: only a UNet's whole mid_block can be removed; name its parts instead")
            root.mid_block = None
        for name in sorted(stages, key=lambda s: -int(s.rsplit(".", 1)[1])):
            owner_name, idx = name.rsplit(".", 1)
            container = modules[owner_name] if owner_name in modules else getattr(root, owner_name)
            del container[int(idx)]

        if component == "unet":
            check_unet_skips(root)
            sync_unet_config(root)
        after = sum(p.numel() for p in root.parameters())
        return PassResult(program, modified=True, stats={
            "removed": names, "skipped_in_place": skipped, "params_removed": before - after,
        })


def _expand(names: list[str], root: nn.Module) -> list[str]:
    out = []
    for name in names:
        m = re.fullmatch(r"stage:(\d+)", name)
        if not m:
            out.append(name)
            continue
        k = int(m[1])
        if not hasattr(root, "down_blocks"):
            raise UsageError(f"remove_blocks: '{name}' names a UNet stage; this component has none")
        n = len(root.down_blocks)
        if not 0 <= k < n:
            raise UsageError(f"remove_blocks: 'stage:{k}' out of range; the UNet has stages 0..{n - 1}")
        out += [f"down_blocks.{k}", f"up_blocks.{n - 1 - k}"]
        if k == n - 1 and k > 0 and root.down_blocks[k - 1].downsamplers is not None:
            out.append(f"down_blocks.{k - 1}.downsamplers")  # the new innermost stage keeps its resolution
    return out


def _remove_layer(parent: nn.Module, parent_name: str, idx: int, kinds: set[str], keep_skips: bool = False) -> tuple[list[str], list[str]]:
    """Remove layer ``idx`` of a block container, or skip its attention/ResNet in place."""
    if "layers" in kinds:  # a plain ModuleList of shape-preserving layers (CLIP encoder layers)
        del parent[idx]
        return [f"{parent_name}.{idx}"], []
    resnets = getattr(parent, "resnets", None)
    attentions = getattr(parent, "attentions", None)
    has_attn = attentions is not None and len(attentions) > 0
    is_mid = parent_name.endswith("mid_block")
    whole_layer = "resnets" in kinds and ("attentions" in kinds or not has_attn or idx >= len(attentions))
    if whole_layer and not is_mid and not keep_skips:
        del resnets[idx]
        if has_attn and idx < len(attentions):
            del attentions[idx]
        return [f"{parent_name}.resnets.{idx}"] + ([f"{parent_name}.attentions.{idx}"] if "attentions" in kinds else []), []
    skipped = []
    if "attentions" in kinds:
        attentions[idx] = SkippedBlock("attention", f"{parent_name}.attentions.{idx}")
        skipped.append(f"{parent_name}.attentions.{idx}")
    if "resnets" in kinds:
        r = resnets[idx]
        if getattr(r, "in_channels", None) != getattr(r, "out_channels", None):
            raise UsageError(
                f"remove_blocks: '{parent_name}.resnets.{idx}' changes channels {r.in_channels}->{r.out_channels}; "
                "it can only go together with its attention (the whole layer)")
        resnets[idx] = SkippedBlock("resnet", f"{parent_name}.resnets.{idx}")
        skipped.append(f"{parent_name}.resnets.{idx}")
    return [], skipped


def _out_channels(block: nn.Module, ch: int) -> int:
    return ch if isinstance(block, SkippedBlock) else block.out_channels


def check_unet_skips(unet: nn.Module) -> None:
    """Walk the UNet's skip connections; raise naming the first up-block ResNet whose skip input no longer
    matches in channels or resolution, or the skips left over."""
    ch = unet.conv_in.out_channels
    level = 0
    skips: list[tuple[int, int, str]] = [(ch, level, "conv_in")]
    for i, block in enumerate(unet.down_blocks):
        for j, r in enumerate(block.resnets):
            ch = _out_channels(r, ch)
            skips.append((ch, level, f"down_blocks.{i}.resnets.{j}"))
        if getattr(block, "downsamplers", None) is not None:
            level += 1
            skips.append((ch, level, f"down_blocks.{i}.downsamplers"))
    for i, block in enumerate(unet.up_blocks):
        for j, r in enumerate(block.resnets):
            where = f"up_blocks.{i}.resnets.{j}"
            if not skips:
                raise PreconditionError("remove_blocks", f"{where} has no skip connection left to consume; remove it too")
            s_ch, s_level, src = skips.pop()
            if s_level != level:
                raise PreconditionError("remove_blocks",
                                        f"{where} runs at 1/{2 ** level} resolution but its skip from {src} is at 1/{2 ** s_level}")
            if ch + s_ch != r.in_channels:
                raise PreconditionError("remove_blocks",
                                        f"{where} expects {r.in_channels} input channels but gets {ch}+{s_ch} (skip from {src})")
            ch = r.out_channels
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    if skips:
        raise PreconditionError("remove_blocks", f"skip connections from {', '.join(s[2] for s in skips)} are left unconsumed; "
                                "remove the matching up-block layers")
    if level != 0:
        raise PreconditionError("remove_blocks", f"down and up samplers no longer pair up (output at 1/{2 ** level} resolution)")
