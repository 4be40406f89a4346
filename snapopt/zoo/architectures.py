"""Configurations of the snapshapes teacher: SD-v1.5's exact block layout at narrow widths.

Only widths shrink. The UNet keeps CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn,
UpBlock2D + CrossAttnUpBlock2D x3 with two layers per block; the VAE keeps four stages (f=8), so a
128x128 image maps to a 16x16x4 latent; the text encoder is a CLIP text transformer with 77 positions.
Graph-level tooling (capture, block pruning, lowering) therefore sees the same structure as SD-v1.5.
"""

from __future__ import annotations

from .vocabulary import BOS, EOS, MAX_LENGTH, build_vocab

TEXT_WIDTH = 128
LATENT_SIZE = 16

# SD-v1.5's noise schedule (scaled_linear betas); see docs/zoo.md for epsilon. Shipped as DDIM, not SD-v1.5's PNDM:
# PNDM's 3rd/4th-order PLMS steps are unstable on this model at guidance 7.5 (16 held-out prompts, 25 steps:
# PNDM 17.8% attributes, order <= 2 87.8%, DDIM 88.9%, DPM-Solver++ 2M 90.0%).
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}


def text_encoder_config() -> dict:
    vocab, _ = build_vocab()
    return dict(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(40, 80, 160, 160),
        layers_per_block=2,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,  # SD-v1.5's value (diffusers reads it as the number of heads)
        norm_num_groups=8,
    )


def vae_config(scaling_factor: float = 1.0) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=scaling_factor,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_encoder_config()))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(scaling_factor))
