"""Run-time block skipping and value-score block pruning (SnapFusion's architecture evolving)."""

import json

import pytest
import torch

import snapopt
from snapopt.core import PassContext, PassManager
from snapopt.core.verify import run_component
from snapopt.devices.registry import TARGETS
from snapopt.errors import PreconditionError, UsageError
from snapopt.models.skipping import skip_blocks, skippable_blocks
from snapopt.passes.block_prune import BlockPrune


def test_skipping_is_identity_and_restores(tiny, tiny_shapes):
    names = skippable_blocks(tiny.unet)
    assert names["down_blocks.0.attentions.0"] == "attention" and names["down_blocks.0.resnets.1"] == "resnet"
    assert "down_blocks.1.resnets.0" not in names  # 32 -> 64 channels: cannot be identity
    state = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    base = run_component(tiny, "unet", tiny_shapes).tensors[0]
    with skip_blocks(tiny.unet, ["down_blocks.0.attentions.0", "mid_block.resnets.0"]):
        skipped = run_component(tiny, "unet", tiny_shapes).tensors[0]
        assert type(tiny.unet.mid_block.resnets[0]).__name__ == "SkippedBlock"
    assert not torch.allclose(base, skipped)
    assert torch.equal(run_component(tiny, "unet", tiny_shapes).tensors[0], base)
    assert all(torch.equal(v, tiny.unet.state_dict()[k]) for k, v in state.items())
    with pytest.raises(UsageError, match="cannot be skipped"):
        with skip_blocks(tiny.unet, ["up_blocks.1.resnets.0"]):
            pass


def test_block_prune_meets_budget_and_reports(tiny, tiny_shapes, tmp_path):
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")], work_dir=tmp_path)
    candidates = ["down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "down_blocks.2.attentions.1", "down_blocks.3.resnets.0",
                  "mid_block.resnets.0", "mid_block.attentions.0", "up_blocks.1.attentions.2", "up_blocks.3.attentions.1"]
    opts = {"budget_fraction": 0.9, "prompts": 2, "timesteps": [900, 300], "reevaluate_every": 2, "candidates": candidates}
    out, (rec,) = PassManager([BlockPrune(opts)], ctx).run(tiny)
    s = rec.stats
    assert s["final_ms"] <= s["budget_ms"] < s["baseline_ms"]
    assert s["removed"] and s["evaluations"] >= len(candidates)
    # the removed blocks are gone physically (parameter-free stand-ins), the rest keep the teacher's weights
    assert rec.changes["unet"]["params_after"] < rec.changes["unet"]["params_before"]
    for name in s["removed"]:
        assert type(out.unet.get_submodule(name)).__name__ == "SkippedBlock"
    # the lowest-value block of the first round is the first one removed
    first = [r for r in ctx.report["block_prune"][0]["evaluations"] if r["round"] == 0]
    assert min(first, key=lambda r: r["value"])["block"] == s["removed"][0] or s["added_back"]
    assert (tmp_path / "block_prune_value.png").stat().st_size > 5000
    assert any(sec["title"].startswith("Block pruning") for sec in ctx.report["sections"])


def test_block_prune_result_reloads(tiny, tiny_shapes, tmp_path):
    from snapopt.core.verify import compare
    from snapopt.serialization import save

    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")])
    out, _ = PassManager([BlockPrune({"budget_fraction": 0.95, "prompts": 1, "timesteps": [500],
                                      "candidates": ["mid_block.attentions.0", "down_blocks.3.resnets.1", "up_blocks.1.attentions.2"]})],
                         ctx).run(tiny)
    save(out, tmp_path / "m")
    edits = json.loads((tmp_path / "m" / "unet" / "snapopt_arch.json").read_text())["edits"]
    assert edits[0]["pass"] == "remove_blocks" and edits[0]["options"]["keep_skips"] is True
    again = snapopt.load(tmp_path / "m")
    assert compare(run_component(out, "unet", tiny_shapes), run_component(again, "unet", tiny_shapes)) < 1e-6


def test_block_prune_bad_options(tiny, tiny_shapes):
    with pytest.raises(Exception, match="exactly one of budget_ms and budget_fraction"):
        BlockPrune({"budget_ms": 1.0, "budget_fraction": 0.5})
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")])
    with pytest.raises(PreconditionError, match="not reachable"):
        PassManager([BlockPrune({"budget_ms": 0.001, "prompts": 1, "timesteps": [500],
                                 "candidates": ["mid_block.attentions.0"]})], ctx).run(tiny)


def test_block_prune_interleaves_robust_training(tiny, tiny_shapes, tmp_path, monkeypatch):
    """Algorithm 1: a robust-training round before every scoring round; chosen blocks stay skipped while training.
    The data pool is built once, with the teacher on the training device (rendering and encoding 4096 scenes on
    the host's cores cost a GPU chain ~90 s)."""
    import contextlib

    import snapopt.train.jobs as jobs
    from snapopt.train.data import LatentSource

    on_device, real_on_device = [0], jobs.on_device

    @contextlib.contextmanager
    def tracked(pipes, device):
        on_device[0] += 1
        try:
            with real_on_device(pipes, device):
                yield
        finally:
            on_device[0] -= 1

    monkeypatch.setattr(jobs, "on_device", tracked)
    built = []
    init = LatentSource.__init__
    monkeypatch.setattr(LatentSource, "__init__", lambda self, *a, **k: (built.append(on_device[0] > 0), init(self, *a, **k))[1])
    teacher_state = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    ctx = PassContext(shapes=tiny_shapes, targets=[TARGETS.resolve("iphone-14-pro")], work_dir=tmp_path, teacher=tiny)
    candidates = ["down_blocks.0.attentions.0", "down_blocks.0.resnets.1", "mid_block.attentions.0", "up_blocks.3.attentions.1"]
    robust = {"train": {"steps": 2, "batch": 2, "progress": False, "optim": {"lr": 1e-3}}, "robust": {"attention": 0.5, "resnet": 0.5},
              "eval_timesteps": [500]}
    opts = {"budget_fraction": 0.97, "prompts": 1, "timesteps": [500], "reevaluate_every": 1, "candidates": candidates,
            "robust_training": robust}
    out, (rec,) = PassManager([BlockPrune(opts)], ctx).run(tiny)
    s = rec.stats
    rounds = sorted({r["round"] for r in ctx.report["block_prune"][0]["evaluations"]})
    assert [r["round"] for r in s["robust_rounds"]] == rounds and all(r["steps"] == 2 for r in s["robust_rounds"])
    assert [r["skipped"] for r in s["robust_rounds"]] == rounds  # one more block skipped per round (reevaluate_every 1)
    assert len(rounds) > 1 and built == [True]  # the data pool is built once for all rounds, on the training device
    assert s["final_ms"] <= s["budget_ms"]
    assert all(torch.equal(v, tiny.unet.state_dict()[k]) for k, v in teacher_state.items())  # the teacher is never trained
    kept = out.unet.state_dict()
    assert any(not torch.equal(kept[k], teacher_state[k]) for k in kept if k in teacher_state)
    assert (tmp_path / "block_prune-0-round0" / "losses.csv").is_file()
    assert any("Robust training between rounds" in line for sec in ctx.report["sections"] for line in sec["lines"])
    with pytest.raises(PreconditionError, match="robust_training needs the teacher"):
        PassManager([BlockPrune(opts)], PassContext(shapes=tiny_shapes, targets=ctx.targets)).run(tiny)
    # robust_weights: discard: the same search, then the blocks come out of the weights the pass received
    ctx2 = PassContext(shapes=tiny_shapes, targets=ctx.targets, work_dir=tmp_path / "discard", teacher=tiny)
    out2, (rec2,) = PassManager([BlockPrune({**opts, "robust_weights": "discard"})], ctx2).run(tiny)
    assert rec2.stats["robust_weights"] == "discard" and len(rec2.stats["robust_rounds"]) == len(s["robust_rounds"])
    kept2 = out2.unet.state_dict()
    assert kept2.keys() < teacher_state.keys() and all(torch.equal(v, teacher_state[k]) for k, v in kept2.items())
