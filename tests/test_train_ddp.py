"""The DDP path (torch.distributed, gloo, 2 processes on CPU) matches one process at equal global batch."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp


def _job(out_path: str | None):
    """Recover a BK-SDM-Small-style tiny student for 2 steps at global batch 4; return (losses, weights)."""
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
    # eps well above the rounding noise of a gradient sum keeps Adam's step Lipschitz in the gradient
    # (|d step / d g| <= lr / eps), so all-reduce rounding cannot flip a near-zero weight by a whole lr step.
    o = TrainOptions(steps=2, batch=4, progress=False, optim=dict(lr=1e-3, eps=1e-3), device="cpu")
    obj = RecoverObjective(teacher, student.unet, o, RecoverLoss(), device=device)
    hist = Trainer(obj, o, None, info=info, device=device).run().history
    obj.close()
    result = ([r["loss"] for r in hist], {k: v.clone() for k, v in student.unet.state_dict().items()})
    if out_path is not None and info.main:
        torch.save(result, out_path)
    return result


def load_start_weights() -> dict:
    """The student's weights before training, built the same way as in _job."""
    from snapopt.models import load_model

    return {k: v.clone() for k, v in load_model("arch:tiny", seed=0).unet.state_dict().items()}


@contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """One spawned process as rank ``rank`` of ``world`` (torchrun's environment), its process group torn down after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        yield
    finally:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_path: str):
    with gloo_rank(rank, world, port):
        _job(out_path)


def test_ddp_two_processes_match_one(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp_losses, ddp_weights = torch.load(out, weights_only=True)
    n = torch.get_num_threads()
    try:
        losses, weights = _job(None)
    finally:
        torch.set_num_threads(n)
    assert len(losses) == len(ddp_losses) == 2
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    # With eps = 1e-3 each Adam step moves a weight by at most lr/eps = 1x its gradient difference; fp32
    # gradient sums (clipped to norm 1) differ by < 1e-6 with the all-reduce's summation order, so two steps
    # leave the weights within 2e-6: 1e-5 holds with margin on any machine, and a wrong gradient average
    # (e.g. a sum, or one rank's gradient) moves weights by ~lr, 100x more.
    diffs = torch.cat([(ddp_weights[k] - weights[k]).abs().flatten() for k in weights])
    assert diffs.max() < 1e-5, float(diffs.max())
    start = load_start_weights()
    moved = torch.cat([(weights[k] - start[k]).abs().flatten() for k in weights if k in start and start[k].shape == weights[k].shape])
    assert moved.max() > 1e-4  # training did move the weights, so the comparison above means something
