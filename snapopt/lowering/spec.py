"""The recipe's ``export:`` section: what is lowered, for which runtime, and how it is compressed.

Lives beside the lowering code so that an export option and the code honouring it change together.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Component = Literal["unet", "vae_decoder", "vae_encoder", "text_encoder"]
Compression = Literal["auto", "none", "palettize", "int8"]


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    coreml: bool = True
    onnx: bool = True
    components: list[Component] = Field(default_factory=lambda: ["unet", "vae_decoder", "text_encoder"])
    weight_bits: int = Field(16, ge=1, le=16, description="16 for fp16 weights; 1-8 palettizes Core ML weights (bits per weight)")
    onnx_check: bool = True
    compression: Compression = Field(
        "auto", description="Core ML weight compression: auto (palettize when weight_bits < 16, else the target profile's "
        "weight_bits), none, palettize (k-means LUT, weight_bits), int8 (linear int8 weights)")
    palettize_group_size: int = Field(0, ge=0, description="0: one LUT per tensor; N: one LUT per N output channels "
                                      "(per-grouped-channel palettization, iOS 18+)")
    chunk_unet: Union[bool, Literal["auto"]] = Field(
        "auto", description="split the UNet into UnetChunk1/UnetChunk2: auto when its compressed weights exceed the "
        "smallest max_weights_per_model_mb of the recipe's targets")
    coreai: bool = Field(False, description="also lower every component to a Core AI .aimodel (coreai-torch), same interface names")
    coreai_check: bool = Field(True, description="run each .aimodel in coreai.runtime (works on Linux) against torch")
    apple_check: bool = Field(True, description="run `snapopt check apple` on the Core ML export and fail the run if it does not pass")

    @model_validator(mode="after")
    def _bits(self):
        if not (self.weight_bits == 16 or 1 <= self.weight_bits <= 8):
            raise ValueError(f"weight_bits: {self.weight_bits} is neither 16 (fp16) nor a palettization width 1-8")
        return self
