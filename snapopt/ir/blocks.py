"""Which modules are *blocks*: the units passes remove, prune and rewrite, and cost models price.

A block is a ResNet, a Transformer/attention block, a down/up sampler, a text-encoder layer, or one of the
stems and heads (conv_in, time embedding, conv_out …). Names are the diffusers module paths users see.
"""

from __future__ import annotations

import re

from torch import nn

BLOCK_KINDS = {
    "ResnetBlock2D": "resnet",
    "Transformer2DModel": "attention",
    "Attention": "attention",
    "Downsample2D": "downsample",
    "Upsample2D": "upsample",
    "CLIPEncoderLayer": "text_layer",
    "CLIPTextEmbeddings": "embedding",
    "SkippedBlock": "skipped",
}

#: leaf module name -> (block name suffix, kind): stems and heads made of several modules
_ALIASES = {
    "conv_in": ("conv_in", "conv_in"),
    "time_proj": ("time_embedding", "time_embedding"),
    "time_embedding": ("time_embedding", "time_embedding"),
    "add_time_proj": ("time_embedding", "time_embedding"),
    "add_embedding": ("time_embedding", "time_embedding"),
    "conv_norm_out": ("conv_out", "conv_out"),
    "conv_act": ("conv_out", "conv_out"),
    "conv_out": ("conv_out", "conv_out"),
    "post_quant_conv": ("post_quant_conv", "conv_in"),
    "quant_conv": ("quant_conv", "conv_out"),
    "final_layer_norm": ("final_layer_norm", "norm"),
}


def find_blocks(root: nn.Module) -> dict[str, str]:
    """Module path -> block name for every module that belongs to a block (innermost block wins for
    lookups, outermost here: nested Attention inside a Transformer2DModel belongs to the transformer)."""
    owner: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for path, module in root.named_modules():
        if not path:
            continue
        if any(path.startswith(b + ".") for b in kinds):
            continue  # inside a block already
        cls = type(module).__name__
        leaf = path.rsplit(".", 1)[-1]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if cls in BLOCK_KINDS:
            kinds[path] = BLOCK_KINDS[cls]
            owner[path] = path
        elif leaf in _ALIASES and _is_stem_parent(parent):
            suffix, kind = _ALIASES[leaf]
            name = f"{parent}.{suffix}" if parent else suffix
            kinds.setdefault(name, kind)
            owner[path] = name
    return {"owner": owner, "kinds": kinds}


def _is_stem_parent(parent: str) -> bool:
    # stems/heads sit at the component root, or at the root of the VAE's encoder/decoder or CLIP's text_model
    return parent in ("", "decoder", "encoder", "text_model")


_STAGE = re.compile(r"^((?:decoder\.|encoder\.)?(?:down_blocks|up_blocks)\.\d+|(?:decoder\.|encoder\.)?mid_block)")


def stage_of(block: str) -> str:
    """``down_blocks.1.attentions.0`` -> ``down_blocks.1``; stems map to themselves."""
    m = _STAGE.match(block)
    return m.group(1) if m else block
