"""remove_blocks: BK-SDM's three students with their published parameter counts, and clear refusals."""

import pytest
import torch

from conftest import BK_BASE, BK_SMALL, BK_TINY
from snapopt.core import PassContext, PassManager
from snapopt.core.verify import run_component
from snapopt.errors import PreconditionError, UsageError
from snapopt.lowering.interfaces import Shapes
from snapopt.models import load_model
from snapopt.passes.remove_blocks import RemoveBlocks
from snapopt.recipe import load_recipe


@pytest.mark.parametrize("recipe, expected", [
    ("recipes/bk-sdm-base.yaml", 579_384_964),
    ("recipes/bk-sdm-small.yaml", 482_346_884),
    ("recipes/bk-sdm-tiny.yaml", 323_384_964),
])
def test_bk_sdm_recipes_reproduce_published_counts(recipe, expected):
    resolved = load_recipe(recipe)
    pipe = load_model(resolved.recipe.model, structure_only=True, components=["unet"])
    ctx = PassContext(shapes=Shapes(resolution=512, batch=2))
    out, records = PassManager(resolved.passes, ctx).run(pipe)
    assert sum(p.numel() for p in out.unet.parameters()) == expected
    assert records[0].changes["unet"]["params_after"] == expected
    # diffusers' config still describes the student exactly (so save_pretrained round-trips)
    cfg = out.unet.config
    assert cfg.layers_per_block == 1
    assert (cfg.mid_block_type is None) == ("base" not in recipe)


@pytest.mark.parametrize("blocks", [BK_BASE, BK_SMALL, BK_TINY], ids=["base", "small", "tiny"])
def test_bk_students_keep_teacher_weights_and_run(tiny, tiny_shapes, blocks):
    teacher_w = tiny.unet.down_blocks[1].resnets[0].conv1.weight.clone()
    ctx = PassContext(shapes=tiny_shapes)
    out, records = PassManager([RemoveBlocks({"blocks": blocks})], ctx).run(tiny)
    assert torch.equal(out.unet.down_blocks[1].resnets[0].conv1.weight, teacher_w)
    v = records[0].verification["unet"]
    assert v["runs"] is True and v["finite"] is True and v["relative_error"] > 0  # lossy: divergence reported
    y = run_component(out, "unet", tiny_shapes).tensors[0]
    assert y.shape == (2, 4, 8, 8)


def test_failed_removal_leaves_input_untouched(tiny, tiny_shapes):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    ctx = PassContext(shapes=tiny_shapes)
    # removing a down layer without the matching up layer leaves a skip connection unconsumed
    with pytest.raises(PreconditionError, match=r"pass 'remove_blocks'.*skip"):
        PassManager([RemoveBlocks({"blocks": ["down_blocks.1.resnets.1", "down_blocks.1.attentions.1"]})], ctx).run(tiny)
    after = tiny.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_channel_changing_resnet_cannot_go_alone(tiny, tiny_shapes):
    with pytest.raises(PreconditionError, match="changes channels 32->64"):
        PassManager([RemoveBlocks({"blocks": ["down_blocks.1.resnets.0"]})], PassContext(shapes=tiny_shapes)).run(tiny)


def test_lone_attention_becomes_skipped_block(tiny, tiny_shapes):
    out, rec = PassManager([RemoveBlocks({"blocks": ["down_blocks.0.attentions.0", "mid_block.attentions.0"]})],
                           PassContext(shapes=tiny_shapes)).run(tiny)
    assert rec[0].stats["skipped_in_place"] == ["down_blocks.0.attentions.0", "mid_block.attentions.0"]
    assert type(out.unet.down_blocks[0].attentions[0]).__name__ == "SkippedBlock"
    assert sum(p.numel() for p in out.unet.down_blocks[0].attentions[0].parameters()) == 0


def test_unknown_block_and_bad_options():
    with pytest.raises(UsageError, match="no block 'down_blocks.9'"):
        pipe = load_model("arch:tiny", structure_only=True, components=["unet"])
        RemoveBlocks({"blocks": ["down_blocks.9"]}).run(pipe, PassContext())
    with pytest.raises(Exception, match="blocks listed twice"):
        RemoveBlocks({"blocks": ["mid_block", "mid_block"]})
