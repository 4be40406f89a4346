"""The teacher's own sampling trajectories, as training states for step distillation.

Step distillation normally trains at x_t made by noising data. The sampler never visits those states: it
starts from pure noise (at t = 876 on the leading 8-step grid, where noised data still keeps 14% of its
signal) and, under guidance, walks states that no noised image resembles. A student fitted only on noised
data is off its training distribution exactly where it is used. A :class:`TrajectoryPool` holds, for each of
``n`` prompts (and guidance scales), the teacher's states at every point of the student's grid, walked from
pure noise on the split path (each student step as its two teacher steps, or ``substeps``). The state after a
student step is then exactly the teacher's result from the state before it: the distillation target is read from
the pool, and these training steps need no teacher forward.
"""

from __future__ import annotations

import torch

from snapopt.core.phases import phase
from snapopt.train.accel import to_device
from snapopt.train.replay import StaticReplay


class TrajectoryPool:
    """``states[i, k]``: trajectory i at the student's k-th grid point (k = K: after its last step);
    ``prompt[i]`` indexes the data source's prompt embeddings; ``scale[i]``: the guidance it was walked with
    (None for the plain kind: the conditional prediction alone)."""

    @phase("trajectory pool")
    def __init__(self, objective, n: int, *, guided: bool, seed: int, batch: int = 512, graphs: bool | None = None):
        """``graphs`` (default: on a GPU): each chunk's teacher walks replayed from one CUDA graph per chunk size."""
        data, device = objective.data, objective.data.device
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, len(data.cond_bank), (n,), generator=gen)
        lo, hi = objective.lo.cfg_range
        self.scale = (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device) if guided else None
        noise = torch.randn(n, *data.shape, generator=gen)
        graphs = device.type == "cuda" if graphs is None else graphs
        walk = _graphed_walk(objective, guided) if graphs else None
        replays: dict[int, StaticReplay] = {}  # one graph per chunk size (the last chunk may be shorter)
        chunks = []
        for a in range(0, n, batch):
            x = to_device(noise[a:a + batch], device)
            cond = data.cond_bank[to_device(self.prompt[a:a + batch], data.cond_bank.device)].to(device)
            uncond = data.uncond.expand_as(cond)
            scale = self.scale[a:a + batch] if guided else None
            seq = [x]
            if walk is not None:  # each teacher walk recorded once as a CUDA graph: same kernels, same states
                args = {"x": x, "cond": cond, "uncond": uncond, **({"scale": scale} if guided else {})}
                step = replays.get(len(x))
                if step is None:
                    t0 = torch.full((len(x),), objective.transitions[0][0], device=device)
                    step = replays[len(x)] = StaticReplay(walk, {**args, "t": t0, "t_end": t0}, state="x")
                step.load(**args)
                for t, t_end in objective.transitions:
                    seq.append(step(t=t, t_end=t_end).clone())
            else:
                for t, t_end in objective.transitions:
                    tt, te = torch.full((len(x),), t), torch.full((len(x),), t_end)
                    x = objective.teacher_walk(x, tt, cond, uncond, scale, te).float()
                    seq.append(x)
            chunks.append(torch.stack(seq, 1))
        self.states = torch.cat(chunks)

    def __len__(self) -> int:
        return len(self.states)


def _graphed_walk(objective, guided: bool):
    """The objective's teacher walk from device timesteps, alpha_bar read on the device (the same float64 table)."""
    from snapopt.train.graphs import DeviceSchedule, _swapped

    device = objective.data.device
    sched = DeviceSchedule(objective.sched, device)  # on the CPU too: the tests then run what a GPU captures

    def walk(x, t, t_end, cond, uncond, scale=None):
        with _swapped(objective, sched=sched):
            return objective.teacher_walk(x, t, cond, uncond, scale if guided else None, t_end).float()

    return walk
