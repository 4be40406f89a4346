"""A worked custom pass (docs/writing-a-pass.md): keep only the first N layers of the CLIP text encoder.

Stable Diffusion 2 conditions on CLIP's penultimate layer ("clip skip"); dropping the last layers of the text
encoder saves its latency on device. The pass is structural (the architecture changes) and not exact.
"""

from pydantic import Field

from snapopt.core import Pass, PassOptions, PassResult
from snapopt.core.phases import phase
from snapopt.errors import UsageError


class KeepTextLayersOptions(PassOptions):
    keep: int = Field(ge=1, description="number of CLIP encoder layers to keep, from the input side")


class KeepTextLayers(Pass):
    """Keep only the first `keep` CLIP text-encoder layers (clip skip)."""

    name = "keep_text_layers"
    Options = KeepTextLayersOptions
    structural = True

    def touches(self):
        return {"text_encoder"}

    def run(self, program, ctx):
        clip = program.text_encoder
        encoder = getattr(clip, "text_model", clip).encoder  # transformers < 5 nests a text_model
        total = len(encoder.layers)
        if self.options.keep > total:
            raise UsageError(f"keep_text_layers: keep={self.options.keep} but the text encoder has {total} layers")
        with phase("drop layers"):  # the report's time line for this pass names it
            del encoder.layers[self.options.keep:]
        program.text_encoder.config.num_hidden_layers = self.options.keep  # keep the config truthful
        return PassResult(program, modified=self.options.keep < total,
                          stats={"layers_before": total, "layers_after": self.options.keep})
