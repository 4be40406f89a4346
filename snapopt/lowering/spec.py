"""The recipe's ``export:`` section: what is lowered, for which runtime, and how it is compressed.

Lives beside the lowering code so that an export option and the code honouring it change together.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Component = Literal["unet", "vae_decoder", "vae_encoder", "text_encoder"]


class ExportSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    coreml: bool = True
    onnx: bool = True
    components: list[Component] = Field(default_factory=lambda: ["unet", "vae_decoder", "text_encoder"])
    weight_bits: int = Field(16, description="16 for fp16 weights; 1-8 palettizes Core ML weights")
    onnx_check: bool = True
