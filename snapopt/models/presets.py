"""Architecture presets: diffusers configs of well-known pipelines, built with random weights.

They exist for structure and latency work (no download needed). Parameter counts are the published ones:
SD-v1.5 UNet 859,520,964, SD-v1.5 VAE decoder 49,490,179, SD-2.1-base UNet 865,910,724.
``tiny`` keeps SD-v1.5's exact block layout with narrow channels, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

_SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

_CLIP_L = dict(  # CLIP ViT-L/14 text tower (SD-v1.x)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
_OPENCLIP_H = dict(  # OpenCLIP ViT-H/14 text tower (SD-2.x), penultimate layer used
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
)


@dataclass(frozen=True)
class ArchPreset:
    """A named pipeline architecture: component configs plus the image resolution it was trained at."""

    name: str
    description: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    prediction_type: str = "epsilon"
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, ArchPreset] = {
    "sd-v1.5": ArchPreset(
        name="sd-v1.5",
        description="Stable Diffusion v1.5 (860M UNet, CLIP ViT-L/14 text encoder)",
        resolution=512,
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
            cross_attention_dim=768, attention_head_dim=8,
        ),
        vae=dict(_SD_VAE, sample_size=512),
        text_encoder=_CLIP_L,
    ),
    "sd-2.1-base": ArchPreset(
        name="sd-2.1-base",
        description="Stable Diffusion 2.1-base (866M UNet, OpenCLIP ViT-H text encoder, linear projections)",
        resolution=512,
        unet=dict(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        ),
        vae=dict(_SD_VAE, sample_size=512),
        text_encoder=_OPENCLIP_H,
    ),
    "sdxl-base": ArchPreset(
        name="sdxl-base",
        description="Stable Diffusion XL base 1.0 (2.6B UNet; text encoder shown is CLIP ViT-L, the first of two)",
        resolution=1024,
        unet=dict(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        vae=dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025),
        text_encoder=dict(_CLIP_L, hidden_act="quick_gelu"),
        extra={"text_embeds_dim": 1280, "time_ids": 6},
    ),
    "tiny": ArchPreset(
        name="tiny",
        description="SD-v1.5's exact block layout with narrow channels (for tests and quick experiments)",
        resolution=64,
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64, 64),
            layers_per_block=2, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        ),
        vae=dict(_SD_VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, sample_size=64),
        text_encoder=dict(
            vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
        ),
    ),
}


def preset(name: str) -> ArchPreset:
    from snapopt.errors import ModelRefError

    try:
        return PRESETS[name]
    except KeyError:
        raise ModelRefError(
            f"unknown architecture preset 'arch:{name}'; available: {', '.join('arch:' + p for p in PRESETS)}"
        ) from None
