"""What Apple's Swift ``StableDiffusionPipeline`` (apple/ml-stable-diffusion) expects of an export, as data.

Facts read from the Swift sources (``swift/StableDiffusion/pipeline/*.swift``) and Apple's converter
(``python_coreml_stable_diffusion/torch2coreml.py``):

* outputs are fp32: Swift converts them with ``MLShapedArray<Float32>(converting:)`` (crashed on fp16,
  apple/ml-stable-diffusion#253); ``input_ids`` is float32 (Swift sends ``Float32(id)``), UNet and VAE inputs fp16;
* ``Encoder.swift`` slices the VAE encoder's only output as mean = channels 0..<4, logvar = 4..<8;
* ``Decoder.swift``/``Encoder.swift`` divide/multiply latents by ``decoderScaleFactor``/``encoderScaleFactor``,
  0.18215 unless the app overrides it (the CLI has no flag; 0.13025 for SDXL);
* the decoder, encoder and text encoder are fed through their *first* input name; the UNet by name
  (``sample``, ``timestep``, ``encoder_hidden_states``) and read through its first output name;
* ``BPETokenizer`` lowercases, splits on spaces only, and maps unknown tokens to ``<|endoftext|>``.

This module makes the wrappers that are lowered (so the scale is folded into the graph), the metadata an
app needs, and the README of the resources folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snapopt.lowering.interfaces import ComponentIO, Shapes, component_io
from snapopt.models.pipeline import Pipeline

SWIFT_SCALE_FACTOR = 0.18215        # StableDiffusionPipeline.Configuration encoder/decoderScaleFactor default
SWIFT_XL_SCALE_FACTOR = 0.13025     # what the Swift CLI sets for SDXL
SWIFT_SCHEDULERS = {"pndm": ".pndmScheduler", "dpmpp": ".dpmSolverMultistepScheduler"}
SWIFT_DEFAULTS = {"scheduler": "pndm", "guidance_scale": 7.5, "step_count": 50}
METADATA_FILE = "snapopt-apple.json"
README_FILE = "README.txt"
ENCODER_CHANNELS = 8  # mean and logvar

#: Per component: Core ML input dtype per name, required fp32 outputs (Apple's converter's choices).
FP32_OUTPUTS = {"unet": ["noise_pred"], "vae_decoder": ["image"], "vae_encoder": ["latent"],
                "text_encoder": ["last_hidden_state", "pooled_outputs"]}


def is_sdxl(pipe: Pipeline) -> bool:
    return pipe.unet is not None and getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def swift_scale_factor(pipe: Pipeline) -> float:
    """The latent scale Swift applies unless the app overrides it."""
    return SWIFT_XL_SCALE_FACTOR if is_sdxl(pipe) else SWIFT_SCALE_FACTOR


def model_scale_factor(pipe: Pipeline) -> float:
    """The latent scale the model was trained with (``vae.config.scaling_factor``)."""
    if pipe.vae is None:
        return swift_scale_factor(pipe)
    return float(pipe.vae.config.scaling_factor)


def scale_ratio(pipe: Pipeline) -> float:
    """``swift / model``: the decoder's input is multiplied by it so Swift's default scale decodes correctly."""
    return swift_scale_factor(pipe) / model_scale_factor(pipe)


class AppleVAEDecoder(nn.Module):
    """``z_swift -> image`` where ``z_swift = latents / swift_scale``; the model wants ``latents / model_scale``."""

    def __init__(self, view: nn.Module, ratio: float):
        super().__init__()
        self.vae_decoder = view
        self.ratio = float(ratio)

    def forward(self, z):
        if self.ratio != 1.0:
            z = z * self.ratio
        return self.vae_decoder(z)


class AppleVAEEncoder(nn.Module):
    """``x -> (mean, logvar)`` on 8 channels, rescaled so that Swift's ``sample * swift_scale`` equals the model's
    ``sample * model_scale``: mean × (model/swift), logvar + 2·ln(model/swift)."""

    def __init__(self, vae: nn.Module, ratio: float):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.ratio = float(ratio)

    def forward(self, x):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        if self.ratio == 1.0:
            return h
        mean, logvar = h.chunk(2, dim=1)
        inv = 1.0 / self.ratio
        return torch.cat([mean * inv, logvar + 2.0 * math.log(inv)], dim=1)


class AppleTextEncoder(nn.Module):
    """``input_ids`` arrive as float32 (Swift sends ``Float32(id)``); exact for ids below 2²⁴."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int32).to(torch.long), return_dict=True)
        return out.last_hidden_state, out.pooler_output


def epsilon_unet(pipe: Pipeline) -> nn.Module:
    """The UNet re-expressed to output epsilon (exact, elementwise): Swift's schedulers read the UNet's output as
    epsilon, so a v-prediction student (SnapFusion's step distillation) ships with the conversion inside the package."""
    from snapopt.train.diffusion import EpsilonOutput

    return EpsilonOutput(pipe.unet, torch.as_tensor(pipe.scheduler.alphas_cumprod), pipe.prediction_type).eval()


def apple_io(pipe: Pipeline, component: str, shapes: Shapes, *, seed: int = 0) -> ComponentIO:
    """The component as Apple's Swift pipeline calls it: same names as :func:`component_io`, with the latent
    scale folded into the VAE halves, an 8-channel encoder output and float32 token ids."""
    io = component_io(pipe, component, shapes, seed=seed)
    if component == "unet" and pipe.prediction_type != "epsilon":
        io.module.unet = epsilon_unet(pipe)
    if component == "vae_decoder":
        io.module = AppleVAEDecoder(io.module.vae_decoder, scale_ratio(pipe)).eval()
    elif component == "vae_encoder":
        io.module = AppleVAEEncoder(pipe.vae, scale_ratio(pipe)).eval()
    elif component == "text_encoder":
        io.module = AppleTextEncoder(io.module.text_encoder).eval()
        io.example_inputs = (io.example_inputs[0].to(torch.float32),)
    return io


def recommended_scheduler(pipe: Pipeline) -> str:
    """A Swift scheduler for this model. Swift has PNDM and DPM-Solver++ only (no DDIM). DPM-Solver++ is a
    deterministic ODE solver like the DDIM sampler snapopt evaluates with; Swift's default PNDM draws broken
    images from zoo:snapshapes (issue 12), so DPM-Solver++ is recommended for every model."""
    return "dpmpp"


def app_settings(pipe: Pipeline, tokenizer_report: dict[str, Any] | None = None, unet_batch: int = 2) -> dict[str, Any]:
    """Everything an app using Apple's Swift pipeline must set, with the reason for each."""
    model_scale, swift_scale = model_scale_factor(pipe), swift_scale_factor(pipe)
    settings: dict[str, Any] = {
        "model_scale_factor": model_scale,
        "swift_scale_factor": swift_scale,
        "scale_folded": abs(model_scale - swift_scale) > 1e-7,
        "encoderScaleFactor": swift_scale,
        "decoderScaleFactor": swift_scale,
        "scheduler": recommended_scheduler(pipe),
        "schedulerType": SWIFT_SCHEDULERS[recommended_scheduler(pipe)],
        # what the exported Unet outputs: a v / x0 model is re-expressed as epsilon inside the package (apple_io)
        "prediction_type": "epsilon",
        "model_prediction_type": pipe.prediction_type,
        "guidanceScale": SWIFT_DEFAULTS["guidance_scale"],
        "resolution": pipe.resolution,
        "unet_batch": unet_batch,
    }
    guidance = (pipe.extra or {}).get("guidance_scale")
    if guidance is not None:
        settings["guidanceScale"] = float(guidance)
    if tokenizer_report is not None:
        settings["prompt_rule"] = tokenizer_report.get("prompt_rule", "none")
    return settings


def app_lines(settings: dict[str, Any], tokenizer_report: dict[str, Any] | None, unet_files: list[str]) -> list[str]:
    """Markdown lines for the report section and the README: what the app must do."""
    lines = []
    if settings["scale_folded"]:
        lines.append(f"- Latent scale: the model's is {settings['model_scale_factor']:.6g}; it is folded into VAEDecoder/VAEEncoder, "
                     f"so keep Swift's default `encoderScaleFactor`/`decoderScaleFactor` = {settings['swift_scale_factor']:g}.")
    else:
        lines.append(f"- Latent scale: {settings['swift_scale_factor']:g}, Swift's default; nothing to set.")
    lines.append(f"- Scheduler: set `schedulerType = {settings['schedulerType']}` (CLI `--scheduler {settings['scheduler']}`); "
                 f"Swift's default PNDM is not what snapopt evaluates with (DDIM, which Swift lacks).")
    how = ("conditional and unconditional in one call" if settings["unet_batch"] == 2
           else "Swift makes two calls per step")
    lines.append(f"- Guidance: `guidanceScale = {settings['guidanceScale']:g}`; the UNet is exported at batch "
                 f"{settings['unet_batch']} ({how}).")
    if settings["prediction_type"] != "epsilon":
        lines.append(f"- Prediction type is {settings['prediction_type']}: Swift's schedulers assume epsilon; this model will not sample correctly.")
    elif settings.get("model_prediction_type", "epsilon") != "epsilon":
        lines.append(f"- Prediction type: the model predicts {settings['model_prediction_type']}; the exported Unet re-expresses it as "
                     "epsilon (exact, alpha-bar table inside the package), so Swift's schedulers need no change.")
    if tokenizer_report is not None:
        if tokenizer_report.get("swift_agrees_raw"):
            lines.append("- Tokenizer: Swift's whitespace-only BPE gives the model's token ids on "
                         f"{tokenizer_report['probes']} probe prompts as shipped"
                         + (" (vocab.json/merges.txt extended for punctuation glued to words)." if tokenizer_report.get("patched") else "."))
        else:
            lines.append(f"- Tokenizer: Swift splits on spaces only; {tokenizer_report['mismatches_raw']} of {tokenizer_report['probes']} "
                         f"probe prompts get different ids unless the app first applies: {tokenizer_report['prompt_rule']}.")
    lines.append(f"- UNet: {' + '.join(unet_files)}.")
    lines.append("- Compile on a Mac (Xcode command line tools): `for p in *.mlpackage; do xcrun coremlcompiler compile \"$p\" .; done`, "
                 "then point `StableDiffusionPipeline(resourcesAt:)` or the CLI's `--resource-path` at this folder.")
    return lines


def write_readme(folder: Path, settings: dict[str, Any], lines: list[str]) -> None:
    text = ["Core ML resources for Apple's ml-stable-diffusion Swift pipeline, written by snapopt.",
            "",
            "Compiling the .mlpackage files to .mlmodelc (what the Swift pipeline loads) needs macOS with Xcode:",
            "",
            "    cd <this folder>",
            "    for p in *.mlpackage; do xcrun coremlcompiler compile \"$p\" .; done",
            "",
            "Then run, e.g.:",
            "",
            f"    swift run StableDiffusionSample \"a prompt\" --resource-path <this folder> --scheduler {settings['scheduler']} "
            f"--guidance-scale {settings['guidanceScale']:g} --compute-units cpuAndNeuralEngine",
            "",
            "What an app must set:",
            "",
            *[line.replace("`", "") for line in lines],
            "",
            f"All of it as data: {METADATA_FILE}. Verify the folder with `snapopt check apple <this folder>`.",
            ""]
    (folder / README_FILE).write_text("\n".join(text))


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def read_metadata(folder: Path) -> dict[str, Any] | None:
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
