"""block_prune scores blocks on the model's own captions where they are known (``prompt_set: auto``): for the zoo
model, its training split, never the held-out captions its FID / CLIP / attribute scores use."""

from __future__ import annotations

from snapopt.core import PassContext, PassManager
from snapopt.devices.registry import TARGETS
from snapopt.passes.block_prune import BlockPrune


def test_domain_prompts_are_the_zoo_training_split():
    from snapopt.models import load_model
    from snapopt.quality import domain_prompts
    from snapopt.zoo import shapes

    zoo = load_model("zoo:snapshapes")
    texts = domain_prompts(zoo, 16, seed=0)
    assert len(texts) == 16 and texts == shapes.sample_scenes(16, 0, split="train").captions()
    assert not set(texts) & set(shapes.heldout_prompts(64).captions())
    assert domain_prompts(load_model("arch:tiny", seed=0), 4) is None  # unknown distribution: VALIDATION_PROMPTS


def _run(tiny, tiny_shapes, monkeypatch, **opts):
    from snapopt import quality

    seen = []
    real = quality.TeacherDistance.prepare.__func__
    monkeypatch.setattr(quality.TeacherDistance, "prepare",
                        classmethod(lambda cls, *a, **k: seen.append(k.get("texts")) or real(cls, *a, **k)))
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")])
    options = {"budget_fraction": 0.97, "prompts": 2, "timesteps": [500], "candidates": ["mid_block.resnets.0", "mid_block.attentions.0"],
               **opts}
    _, (rec,) = PassManager([BlockPrune(options)], ctx).run(tiny)
    return seen, rec.stats


def test_block_prune_uses_the_models_captions_when_known(tiny, tiny_shapes, monkeypatch):
    from snapopt import quality

    captions = ["a small red circle at the center on a white background", "a large blue square at the left on a gray background"]
    monkeypatch.setattr(quality, "domain_prompts", lambda pipe, n, seed=0: captions[:n])  # as for a zoo model
    seen, stats = _run(tiny, tiny_shapes, monkeypatch)
    assert seen == [captions] and stats["evaluator_prompts"] == "the model's training captions"
    seen, stats = _run(tiny, tiny_shapes, monkeypatch, prompt_set="validation")
    assert seen == [None] and stats["evaluator_prompts"] == "VALIDATION_PROMPTS"


def test_block_prune_falls_back_to_validation_prompts(tiny, tiny_shapes, monkeypatch):
    seen, stats = _run(tiny, tiny_shapes, monkeypatch)
    assert seen == [None] and stats["evaluator_prompts"] == "VALIDATION_PROMPTS"
