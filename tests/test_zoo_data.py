"""Dataset, tokenizer and checker of the zoo teacher (CPU, fast)."""

import torch

from snapopt.zoo import checker, shapes, zoo_path
from snapopt.zoo.vocabulary import CaptionIds, caption_words


def test_scenes_and_renders_are_deterministic_by_seed():
    a, b = shapes.sample_scenes(16, seed=5), shapes.sample_scenes(16, seed=5)
    assert a.captions() == b.captions()
    assert torch.equal(shapes.render(a, seed=3), shapes.render(b, seed=3))
    assert shapes.sample_scenes(16, seed=6).captions() != a.captions()
    img = shapes.render(a, seed=3)
    assert img.shape == (16, 3, 128, 128) and img.min() >= -1 and img.max() <= 1


def test_heldout_combinations_never_appear_in_training():
    train = shapes.sample_scenes(2000, seed=1, split="train")
    assert not shapes.is_held_out(train).any()
    held = shapes.heldout_prompts(64)
    assert shapes.is_held_out(held).all()
    assert len(set(held.captions())) == 64
    assert not set(held.captions()) & set(train.captions())


def test_checker_is_at_least_98_percent_right_on_real_images():
    scenes = shapes.sample_scenes(120, seed=11)
    images = shapes.to_uint8(shapes.render(scenes, seed=11))
    acc = checker.accuracy(images, scenes.scenes())
    for key in ("shape_accuracy", "colour_accuracy", "position_accuracy", "size_accuracy", "background_accuracy"):
        assert acc[key] >= 0.98, (key, acc)


def test_checker_rejects_noise():
    scenes = shapes.heldout_prompts(16)
    noise = torch.randint(0, 256, (16, 128, 128, 3), dtype=torch.uint8)
    assert checker.accuracy(noise, scenes.scenes())["attribute_accuracy"] < 0.5


def test_shipped_tokenizer_round_trips_and_matches_training_ids():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(zoo_path("snapshapes") / "tokenizer")
    captions = shapes.sample_scenes(64, seed=2).captions()
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, CaptionIds().batch(captions))
    for caption, row in zip(captions, ids):
        assert tok.decode(row, skip_special_tokens=True).replace(" ,", ",") == caption
    for word in caption_words():  # every caption word is one whole-word token
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
