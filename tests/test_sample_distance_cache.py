"""``sample_distance(cache=...)``: a frozen teacher's latents are sampled once per setting and the distances are
exactly those computed without the cache. Tiny model, CPU, seconds."""

from __future__ import annotations

import torch


def test_cache_samples_the_teacher_once_per_setting_and_changes_nothing(tiny_pipe, tiny, monkeypatch):
    from snapopt.train import evaluation

    with torch.no_grad():
        for p in tiny.unet.parameters():
            p.mul_(0.98)
    kw = dict(prompts=2, cfg=5.0, seed=0, device=torch.device("cpu"))
    plain = [evaluation.sample_distance(tiny_pipe, tiny, 2, 4, **kw), evaluation.sample_distance(tiny_pipe, tiny, 2, 4, halved=True, **kw)]

    calls = []
    real = evaluation.sample_latents
    monkeypatch.setattr(evaluation, "sample_latents", lambda *a, **k: calls.append(k.get("unet")) or real(*a, **k))
    cache: dict = {}
    cached = [evaluation.sample_distance(tiny_pipe, tiny, 2, 4, cache=cache, **kw) for _ in range(2)]
    cached += [evaluation.sample_distance(tiny_pipe, tiny, 2, 4, halved=True, cache=cache, **kw) for _ in range(2)]
    assert cached == [plain[0], plain[0], plain[1], plain[1]]
    teacher_calls = [u for u in calls if u is None]  # the teacher samples without a `unet=` override
    assert len(teacher_calls) == 2 and len(cache) == 2  # one per setting (diffusers' grid, halved grid)
    # other prompts are another setting
    evaluation.sample_distance(tiny_pipe, tiny, 2, 4, cache=cache, texts=["distance cache probe: a red circle", "distance cache probe: a blue square"], **kw)
    assert len(cache) == 3
