"""The program snapopt optimises: a Stable Diffusion pipeline's components as real ``nn.Module``s.

Passes edit these modules in place (on a copy the pass manager hands them), so the recovery trainer can
train the result and ``save_pretrained`` can save it where diffusers' config can express it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import nn

#: Component names used in recipes, the IR and lowering.
COMPONENTS = ("unet", "vae_decoder", "vae_encoder", "text_encoder")


class VAEDecoderView(nn.Module):
    """``z -> image``: post_quant_conv + decoder of an AutoencoderKL, sharing its modules.

    Module paths (``decoder.up_blocks.0.resnets.1``) match the AutoencoderKL's, so block names in the IR
    and in ``remove_blocks`` are the ones users see in diffusers.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VAEEncoderView(nn.Module):
    """``image -> latent mean``: encoder + quant_conv of an AutoencoderKL (deterministic mode)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.encoder(image)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h.chunk(2, dim=1)[0]


@dataclass
class Pipeline:
    """A Stable Diffusion pipeline as snapopt sees it.

    ``resolution`` is the image side in pixels; the latent side follows from the VAE's downsampling.
    ``structure_only`` pipelines live on the meta device: fine for capture, IR and latency, not for running.
    """

    source: str
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    scheduler: Any = None
    resolution: int = 512
    prediction_type: str = "epsilon"
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- shapes -------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        return 8

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def structure_only(self) -> bool:
        for module in self.present_modules().values():
            for p in module.parameters():
                return p.is_meta
        return False

    # ---- components ---------------------------------------------------------------------------------
    def present_modules(self) -> dict[str, nn.Module]:
        return {k: v for k, v in (("unet", self.unet), ("vae", self.vae), ("text_encoder", self.text_encoder)) if v is not None}

    def components(self) -> list[str]:
        names = []
        if self.unet is not None:
            names.append("unet")
        if self.vae is not None:
            names += ["vae_decoder", "vae_encoder"]
        if self.text_encoder is not None:
            names.append("text_encoder")
        return names

    def component(self, name: str) -> nn.Module:
        """The module that computes ``name``; for the VAE halves a view sharing the VAE's modules."""
        from snapopt.errors import UsageError

        if name not in COMPONENTS:
            raise UsageError(f"unknown component '{name}'; expected one of {', '.join(COMPONENTS)}")
        if name == "unet":
            module = self.unet
        elif name == "text_encoder":
            module = self.text_encoder
        else:
            module = None if self.vae is None else (VAEDecoderView(self.vae) if name == "vae_decoder" else VAEEncoderView(self.vae))
        if module is None:
            raise UsageError(f"model '{self.source}' has no component '{name}'")
        return module

    def owner_attr(self, component: str) -> str:
        """Attribute of the pipeline that owns a component's weights (the VAE owns both halves)."""
        return "vae" if component.startswith("vae") else component

    def clone(self, components: Iterable[str] | None = None) -> "Pipeline":
        """A copy whose named components are deep copies (others shared): what a pass may mutate."""
        owners = {self.owner_attr(c) for c in (components if components is not None else self.components())}
        copies = {attr: copy.deepcopy(getattr(self, attr)) for attr in owners}
        return replace(self, extra=dict(self.extra), **copies)

    def to(self, device: str | torch.device) -> "Pipeline":
        for module in self.present_modules().values():
            module.to(device)
        return self

    # ---- diffusers ------------------------------------------------------------------------------------
    def to_diffusers(self):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules, with the scheduler the model ships
        (the input's, e.g. PNDM; ``extra['scheduler']``), so ``pipe("a red circle")`` draws an image."""
        from diffusers import StableDiffusionPipeline

        if self.structure_only:
            from snapopt.errors import ModelRefError

            raise ModelRefError(f"model '{self.source}' is structure-only (no weights); it cannot generate images")
        missing = [n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(self, n) is None]
        if missing:
            from snapopt.errors import ModelRefError

            raise ModelRefError(f"model '{self.source}' has no {', '.join(missing)}; a text-to-image pipeline needs all five")
        sd = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                                     scheduler=self.extra.get("scheduler") or self.scheduler, safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)
        sd.set_progress_bar_config(disable=True)
        return sd

    def __call__(self, prompt, **kwargs):
        """Text to image through diffusers (``num_inference_steps``, ``guidance_scale``, ``generator`` …)."""
        return self.to_diffusers()(prompt, **kwargs)

    def save_pretrained(self, folder) -> None:
        """Write a diffusers pipeline folder (custom components where a config cannot express the structure)."""
        from snapopt.serialization import save

        save(self, folder)
