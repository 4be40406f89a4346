"""Apple ml-stable-diffusion's model interfaces, as thin ``nn.Module`` wrappers.

The same wrappers are captured for analysis and lowered to Core ML/ONNX, so the graph snapopt measures is
the graph the phone runs. Names follow Apple's Swift ``StableDiffusionPipeline``:

* ``Unet``:        sample (B,4,h,w), timestep (B,), encoder_hidden_states (B,D,1,77) -> noise_pred
* ``VAEDecoder``:  z (1,4,h,w) -> image (1,3,8h,8w) in [-1, 1]
* ``VAEEncoder``:  x (1,3,H,W) -> latent mean (1,4,H/8,W/8)
* ``TextEncoder``: input_ids (1,77) -> last_hidden_state, pooled_outputs

These are the graphs snapopt analyses and verifies. What is lowered adds Apple's Swift conventions on top
(:func:`snapopt.lowering.apple.apple_io`): latent scale folded into the VAE halves, the encoder's 8 channels
(mean and logvar), float32 ``input_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from snapopt.models.pipeline import Pipeline

#: Core ML package name per component (what Apple's Swift pipeline looks for in its resources folder).
PACKAGE_NAMES = {"unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder", "text_encoder": "TextEncoder"}


@dataclass(frozen=True)
class Shapes:
    """The fixed shapes a pipeline is captured, verified and lowered at.

    ``batch`` is the UNet batch: 2 under classifier-free guidance (conditional + unconditional)."""

    resolution: int = 512
    batch: int = 2
    text_len: int = 77

    def latent(self, pipe: Pipeline) -> int:
        return self.resolution // pipe.vae_scale_factor


class UnetInterface(nn.Module):
    """Apple's ``Unet`` interface: ``encoder_hidden_states`` arrives in the ANE's (B, C, 1, S) layout."""

    def __init__(self, unet: nn.Module, sdxl_added: dict[str, int] | None = None):
        super().__init__()
        self.unet = unet
        self.sdxl_added = sdxl_added

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        added = None
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, context, added_cond_kwargs=added, return_dict=False)[0]


class VAEDecoderInterface(nn.Module):
    def __init__(self, view: nn.Module):
        super().__init__()
        self.vae_decoder = view

    def forward(self, z):
        return self.vae_decoder(z)


class VAEEncoderInterface(nn.Module):
    def __init__(self, view: nn.Module):
        super().__init__()
        self.vae_encoder = view

    def forward(self, x):
        return self.vae_encoder(x)


class TextEncoderInterface(nn.Module):
    """``input_ids`` travel as int32 (Core ML has no int64 inputs); cast back for the embedding lookup."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.long), return_dict=True)
        return out.last_hidden_state, out.pooler_output


@dataclass
class ComponentIO:
    """A component wrapped in its interface, with example inputs and Apple's tensor names."""

    component: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]

    @property
    def package_name(self) -> str:
        return PACKAGE_NAMES[self.component]


def component_io(pipe: Pipeline, component: str, shapes: Shapes, *, seed: int = 0) -> ComponentIO:
    """Wrap ``component`` of ``pipe`` in its interface and make seeded example inputs at ``shapes``.

    Inputs are on the meta device when the pipeline is structure-only (capture works without weights)."""
    device = torch.device("meta") if pipe.structure_only else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        t = torch.randn(*shape, generator=gen)
        return t.to(device)

    lat = shapes.latent(pipe)
    if component == "unet":
        unet = pipe.unet
        cfg = unet.config
        b = shapes.batch
        inputs = [randn(b, cfg.in_channels, lat, lat), torch.full((b,), 981.0, device=device),
                  randn(b, cfg.cross_attention_dim, 1, shapes.text_len)]
        names = ["sample", "timestep", "encoder_hidden_states"]
        sdxl = None
        if getattr(cfg, "addition_embed_type", None) == "text_time":
            embeds = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs += [randn(b, embeds), torch.tensor([[float(shapes.resolution)] * 2 + [0.0, 0.0] + [float(shapes.resolution)] * 2] * b, device=device)]
            names += ["text_embeds", "time_ids"]
            sdxl = {"text_embeds": embeds}
        return ComponentIO(component, UnetInterface(unet, sdxl).eval(), tuple(inputs), names, ["noise_pred"])
    if component == "vae_decoder":
        latent_channels = pipe.vae.config.latent_channels
        return ComponentIO(component, VAEDecoderInterface(pipe.component(component)).eval(),
                           (randn(1, latent_channels, lat, lat),), ["z"], ["image"])
    if component == "vae_encoder":
        return ComponentIO(component, VAEEncoderInterface(pipe.component(component)).eval(),
                           (randn(1, pipe.vae.config.in_channels, shapes.resolution, shapes.resolution),), ["x"], ["latent"])
    if component == "text_encoder":
        vocab = pipe.text_encoder.config.vocab_size
        ids = torch.randint(0, min(vocab, 500), (1, shapes.text_len), generator=gen, dtype=torch.int32).to(device)
        return ComponentIO(component, TextEncoderInterface(pipe.component(component)).eval(), (ids,), ["input_ids"],
                           ["last_hidden_state", "pooled_outputs"])
    pipe.component(component)  # raises the one-line error for unknown/missing components
    raise AssertionError("unreachable")
