"""The recipe's ``export:`` section: what is lowered, for which runtime, and how it is compressed.

Lives beside the lowering code so that an export option and the code honouring it change together.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Component = Literal["unet", "vae_decoder", "vae_encoder", "text_encoder"]
Compression = Literal["auto", "none", "palettize", "int8", "int4", "mixed", "w8a8"]


class CompressionSpec(BaseModel):
    """``compression: {scheme: mixed, bits: 4.5}``: a scheme with its options (the short string form keeps
    ``weight_bits``/``palettize_group_size`` for its width)."""

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["fp16", "palettize", "int8", "int4", "mixed", "w8a8"]
    bits: Optional[float] = Field(None, description="palettize: 1/2/4/6/8 bits; mixed: target average bits (1-8)")
    group_size: int = Field(0, ge=0, description="palettize: one LUT per N output channels (iOS 18+)")
    block_size: int = Field(32, ge=1, description="int4: input channels per scale block (Core AI only)")
    quality: Literal["psnr", "eval"] = Field(
        "psnr", description="psnr: UNet output PSNR vs fp with the scheme's weights simulated in torch; eval: also "
        "FID / CLIP / attributes on held-out snapshapes prompts (zoo:snapshapes models; costs CPU minutes)")
    eval_prompts: int = Field(8, ge=2, le=256, description="prompts for quality: eval")
    eval_steps: int = Field(25, ge=1, le=200, description="sampler steps for quality: eval (input and compressed alike)")

    @model_validator(mode="after")
    def _bits(self):
        if self.scheme == "palettize" and self.bits not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"compression.bits: palettize needs 1, 2, 3, 4, 6 or 8 bits (got {self.bits})")
        if self.scheme == "mixed" and not (self.bits is not None and 1 <= self.bits <= 8):
            raise ValueError(f"compression.bits: mixed needs a target average between 1 and 8 bits (got {self.bits})")
        if self.scheme in ("fp16", "int8", "int4", "w8a8") and self.bits is not None:
            raise ValueError(f"compression.bits: {self.scheme} has a fixed width; remove bits")
        return self


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    coreml: bool = True
    onnx: bool = True
    components: list[Component] = Field(default_factory=lambda: ["unet", "vae_decoder", "text_encoder"])
    weight_bits: int = Field(16, ge=1, le=16, description="16 for fp16 weights; 1-8 palettizes Core ML weights (bits per weight)")
    onnx_check: bool = True
    compression: Union[Compression, CompressionSpec] = Field(
        "auto", description="Core ML weight compression: auto (palettize when weight_bits < 16, else the target profile's "
        "weight_bits), none, palettize (k-means LUT, weight_bits), int8 (linear int8 weights), mixed (per-layer "
        "palettization widths averaging weight_bits, from a sensitivity analysis), w8a8 (int8 weights and activations: "
        "A17 Pro and later only), int4 (per-block int4 weights: Core AI only), or {scheme: ..., bits: ...} (see docs/apple-runtime.md)")
    palettize_group_size: int = Field(0, ge=0, description="0: one LUT per tensor; N: one LUT per N output channels "
                                      "(per-grouped-channel palettization, iOS 18+)")
    chunk_unet: Union[bool, Literal["auto"]] = Field(
        "auto", description="split the UNet into UnetChunk1/UnetChunk2: auto when its compressed weights exceed the "
        "smallest max_weights_per_model_mb of the recipe's targets")
    coreai: bool = Field(False, description="also lower every component to a Core AI .aimodel (coreai-torch), same interface names")
    coreai_check: bool = Field(True, description="run each .aimodel in coreai.runtime (works on Linux) against torch")
    memory_fit: bool = Field(True, description="predict load-time and peak memory per component and whether the pipeline "
                             "fits each target's per-app limit, all models resident or loaded just in time")
    apple_check: bool = Field(True, description="run `snapopt check apple` on the Core ML export and fail the run if it does not pass")

    @field_validator("compression", mode="before")
    @classmethod
    def _compression(cls, v):
        """A mapping is a CompressionSpec: validate it alone so its error names the field, not the union."""
        if isinstance(v, dict):
            try:
                return CompressionSpec.model_validate(v)
            except ValidationError as exc:
                e = exc.errors()[0]
                loc = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                raise ValueError(msg if msg.startswith("compression.") else f"compression.{loc}: {msg}") from None
        return v

    @model_validator(mode="after")
    def _bits(self):
        if self.compression == "mixed" and self.weight_bits >= 16:
            raise ValueError("compression: mixed needs weight_bits 1-8 (the target average), or {scheme: mixed, bits: N}")
        if not (self.weight_bits == 16 or 1 <= self.weight_bits <= 8):
            raise ValueError(f"weight_bits: {self.weight_bits} is neither 16 (fp16) nor a palettization width 1-8")
        scheme = self.compression.scheme if isinstance(self.compression, CompressionSpec) else self.compression
        if scheme == "int4" and self.coreml:
            raise ValueError("compression: int4 (per-block int4 weights) is a Core AI scheme (coreai-opt); set coreml: false "
                             "and coreai: true, or pick palettize/int8/mixed/w8a8 for Core ML")
        return self
