"""The zoo evaluation does each thing once without changing a number: the batch does not change the images, the
noise is what diffusers drew per call before, and the real renders' features are computed once per process."""

import pytest
import torch

from snapopt.zoo import zoo_path


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(zoo_path("zoo:snapshapes"))


def test_batch_does_not_change_the_images(pipe):
    from snapopt.zoo import shapes
    from snapopt.zoo.evaluate import generate

    captions = shapes.heldout_prompts(8).captions()
    one_call = generate(pipe, captions, steps=2, cfg=7.5, seed=3, batch=8)
    halves = generate(pipe, captions, steps=2, cfg=7.5, seed=3, batch=4)
    uneven = generate(pipe, captions, steps=2, cfg=7.5, seed=3, batch=3)  # chunks of 3, 3, 2
    assert one_call.std() > 0.1
    # the batch changes only the CPU kernels' float rounding, amplified by guidance 7.5 (measured: 3e-5 for batch 4
    # on one thread, bit-equal on two; 2.5e-4 for batch 3), never the noise: a prompt given another prompt's noise
    # would differ by O(1); an 8-bit image step is 7.8e-3
    assert (one_call - halves).abs().max() < 1e-4
    assert (one_call - uneven).abs().max() < 2e-3


def test_noise_is_what_one_diffusers_call_draws(pipe):
    """Same initial latents as before the noise was drawn up front: the images of one call with the seeded generator."""
    from diffusers import DDIMScheduler

    from snapopt.zoo import shapes
    from snapopt.zoo.evaluate import generate

    captions = shapes.heldout_prompts(4).captions()
    ours = generate(pipe, captions, steps=2, cfg=7.5, seed=5, batch=4)
    ref = pipe.__class__(**{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    theirs = ref(captions, height=size, width=size, num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(5), output_type="pt").images.float() * 2 - 1
    assert (ours - theirs).abs().max() < 1e-5


def test_real_features_computed_once_per_evaluator(monkeypatch):
    from snapopt.zoo import evaluate as zev
    from snapopt.zoo import shapes

    scenes = shapes.heldout_prompts(2)
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    first = zev.score_images(images, scenes, seed=11)
    calls = []
    monkeypatch.setattr(zev, "real_images", lambda *a, **k: calls.append(a) or torch.zeros(0))
    assert zev.score_images(images, scenes, seed=11) == first  # cached: renders not redrawn, same numbers
    assert not calls
    with pytest.raises(Exception):  # another seed is another set of real renders: drawn (here: the broken stub)
        zev.score_images(images, scenes, seed=12)
    assert calls


def test_split_einsum_models_are_sampled_with_sdpa_and_keep_their_form(pipe):
    """A run's output ships split-einsum attention (for the Neural Engine); sampling it with sdpa is exact and
    faster (1.14x on CPU, bench/eval_sampling_attention.py), and the model's own processors come back afterwards."""
    from snapopt.models.attention import attention_kinds, attention_modules, sampling_attention, set_attention
    from snapopt.zoo import shapes
    from snapopt.zoo.evaluate import generate

    captions = shapes.heldout_prompts(4).captions()
    reference = generate(pipe, captions, steps=2, cfg=7.5, seed=3, batch=4)  # the zoo model: sdpa already
    original = dict(pipe.unet.attn_processors)
    try:
        set_attention(pipe.unet, "split_einsum")
        shipped = {name: m.processor for name, m in attention_modules(pipe.unet).items()}
        with sampling_attention(pipe.unet) as swapped:
            assert swapped == len(shipped) > 0 and set(attention_kinds(pipe.unet).values()) == {"sdpa"}
        assert all(m.processor is shipped[name] for name, m in attention_modules(pipe.unet).items())
        during = []  # what the UNet computes with while generate() samples
        hook = pipe.unet.register_forward_pre_hook(lambda m, args: during.append(set(attention_kinds(m).values())))
        try:
            images = generate(pipe, captions, steps=2, cfg=7.5, seed=3, batch=4)
        finally:
            hook.remove()
        assert during and all(kinds == {"sdpa"} for kinds in during)
        assert set(attention_kinds(pipe.unet).values()) == {"split_einsum"}
        assert (images - reference).abs().max() < 1e-4
    finally:
        pipe.unet.set_attn_processor(original)
