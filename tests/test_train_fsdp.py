"""FSDP2 (train.parallel: fsdp; torch.distributed, gloo, 2 processes on CPU) matches one process at equal
global batch: losses, the EMA weights handed back to the plain module, and the gathered checkpoint; and
``gather_into`` (the plain module back from its released host copy) gathers every rank's shard."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from test_train_ddp import free_port, gloo_rank, load_start_weights


def _job(out_path: str | None, parallel: str, ck_dir: str | None):
    """Recover a tiny BK-SDM-Small-style student for 2 steps at global batch 4, EMA on; return (losses, weights)."""
    from snapopt.models import load_model
    from snapopt.passes.remove_blocks import RemoveBlocks
    from snapopt.train import RecoverLoss, TrainOptions, Trainer, dist
    from snapopt.train.recover import RecoverObjective

    torch.set_num_threads(1)
    info, device = dist.init("cpu")
    teacher = load_model("arch:tiny", seed=0)
    student = teacher.clone(["unet"])
    RemoveBlocks({"component": "unet", "blocks": ["down_blocks.1.attentions.1", "down_blocks.1.resnets.1", "up_blocks.2.attentions.1",
                                                  "up_blocks.2.resnets.1", "mid_block"]}).run(student, None)
    # eps 1e-3 as in test_train_ddp: Adam's step is then Lipschitz in the gradient (|d step / d g| <= lr / eps)
    o = TrainOptions(steps=2, batch=4, progress=False, ema=0.5, optim=dict(lr=1e-3, eps=1e-3), device="cpu", parallel=parallel)
    obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
    trainer = Trainer(obj, o, ck_dir, info=info, device=device)
    hist = trainer.run().history
    assert trainer.fsdp == (parallel == "fsdp" and info.enabled)  # the sharded path ran where asked
    obj.close()
    result = ([r["loss"] for r in hist], {k: v.clone() for k, v in student.unet.state_dict().items()})
    if out_path is not None and info.main:
        torch.save(result, out_path)
    return result


def _worker(rank: int, world: int, port: int, out_path: str, ck_dir: str):
    with gloo_rank(rank, world, port):
        _job(out_path, "fsdp", ck_dir)


def test_fsdp_two_processes_match_one(tmp_path):
    from snapopt.train import checkpoint as ckpt

    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out), str(tmp_path / "fsdp_run")), nprocs=2, join=True)
    fsdp_losses, fsdp_weights = torch.load(out, weights_only=True)
    n = torch.get_num_threads()
    try:
        losses, weights = _job(None, "ddp", None)
    finally:
        torch.set_num_threads(n)
    assert len(losses) == len(fsdp_losses) == 2
    # Step 0 sees identical weights: the loss differs only by the order of the mean over the 4 samples
    # (2 + 2 across ranks vs 4 at once), ~1e-7 relative in fp32.
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # Weights: FSDP reduce-scatters the gradient where DDP and one process sum it in another order; fp32
    # sums differ by < 1e-6, and with eps = 1e-3 each Adam step passes at most lr/eps = 1x that on, so two
    # steps (and an EMA, a convex mix of them) stay within 2e-6: 1e-5 holds with margin. A wrong average
    # (a sum, one rank's gradient, an EMA of the wrong shard) moves weights by ~lr = 1e-3, 100x more.
    diffs = torch.cat([(fsdp_weights[k] - weights[k]).abs().flatten() for k in weights])
    assert diffs.max() < 1e-5, float(diffs.max())
    start = load_start_weights()
    moved = torch.cat([(weights[k] - start[k]).abs().flatten() for k in weights if k in start and start[k].shape == weights[k].shape])
    assert moved.max() > 1e-4  # training moved the weights, so the comparison above means something
    # the checkpoint holds full tensors in the single-process layout (index-keyed optimizer state)
    saved = ckpt.read(ckpt.latest(tmp_path / "fsdp_run" / "checkpoints"))
    assert set(saved["model"]) == set(weights)
    assert all(saved["model"][k].shape == weights[k].shape for k in weights)
    n_params = sum(1 for k in weights if k in dict(saved["ema"]))
    assert n_params == len(saved["ema"]) and set(saved["optimizer"]["state"]) == set(range(len(saved["ema"])))


def _gather_worker(rank: int, world: int, port: int, out_path: str):
    """Shard a tiny UNet with release=True, move every rank's shards by (rank + 1), gather back."""
    from snapopt.models import load_model
    from snapopt.train import dist, fsdp

    torch.set_num_threads(1)
    with gloo_rank(rank, world, port):
        _, device = dist.init("cpu")
        module = load_model("arch:tiny", seed=0).unet
        start = {k: v.clone() for k, v in module.state_dict().items()}
        sharded = fsdp.shard_copy(module, device, release=True)
        local = {n: p.to_local().numel() for n, p in sharded.named_parameters()}
        with torch.no_grad():
            for p in sharded.parameters():
                p.to_local().add_(rank + 1)
        fsdp.gather_into(module, sharded, device)
        if rank == 0:
            torch.save({"start": start, "after": module.state_dict(), "kind": type(module).__name__,
                        "local": local, "full": {n: p.numel() for n, p in module.named_parameters()}}, out_path)


def test_gather_into_brings_every_shard_back(tmp_path):
    """gather_into puts every rank's shard (not one rank's, not a sum) into the plain module, which stays plain."""
    out = tmp_path / "gather.pt"
    mp.spawn(_gather_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    assert r["kind"] == "UNet2DConditionModel"  # the pipeline's module is not turned into an FSDP class
    params = set(r["full"])
    moved = torch.cat([(r["after"][k] - r["start"][k]).flatten() for k in sorted(params)])
    assert set(moved.round().unique().tolist()) == {1.0, 2.0}  # rank 0's and rank 1's shards both arrived
    torch.testing.assert_close(moved, moved.round(), rtol=0, atol=1e-5)
    assert all(torch.equal(r["after"][k], r["start"][k]) for k in r["start"] if k not in params)  # buffers untouched
    assert sum(r["local"].values()) < 0.6 * sum(r["full"].values())  # rank 0 held about half the weights
