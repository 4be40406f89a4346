"""Feature distillation at stage outputs (BK-SDM), with a teacher<->student stage map that survives
block removal.

BK-SDM matches the outputs of every down/mid/up *stage*. Removing a layer inside a stage keeps its name
(``down_blocks.1`` stays ``down_blocks.1``) and its output shape, so stages map by name. Removing a whole
stage re-indexes its siblings; the structural edit log that the pass manager keeps on the module
(``remove_blocks`` edits) says which stages went, and the map follows it. A stage the student lacks is
skipped; a pair whose shapes differ (channel pruning changed the stage's width) is dropped and reported.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from snapopt.errors import UsageError


def stage_names(unet: nn.Module) -> list[str]:
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def stage_map(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """student stage name -> teacher stage name, following removed stages in the student's edit log."""
    from snapopt.serialization import EDITS_ATTR

    down = list(range(len(teacher.down_blocks)))  # current index -> original index
    up = list(range(len(teacher.up_blocks)))
    for edit in getattr(student, EDITS_ATTR, []):
        if edit.get("pass") != "remove_blocks" or edit.get("options", {}).get("component", "unet") != "unet":
            continue
        gone_down, gone_up = set(), set()
        for name in edit["options"].get("blocks", []):
            m = re.fullmatch(r"stage:(\d+)", name)
            if m:
                gone_down.add(int(m[1]))
                gone_up.add(len(down) - 1 - int(m[1]))
            m = re.fullmatch(r"(down|up)_blocks\.(\d+)", name)
            if m:
                (gone_down if m[1] == "down" else gone_up).add(int(m[2]))
        down = [o for i, o in enumerate(down) if i not in gone_down]
        up = [o for i, o in enumerate(up) if i not in gone_up]
    out = {}
    if len(down) == len(student.down_blocks):
        out.update({f"down_blocks.{i}": f"down_blocks.{o}" for i, o in enumerate(down)})
    if len(up) == len(student.up_blocks):
        out.update({f"up_blocks.{i}": f"up_blocks.{o}" for i, o in enumerate(up)})
    if getattr(student, "mid_block", None) is not None and getattr(teacher, "mid_block", None) is not None:
        out["mid_block"] = "mid_block"
    return out


class StageTap:
    """Forward hooks that keep the latest output of the named stages of a UNet."""

    def __init__(self, unet: nn.Module, names: Iterable[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(unet.named_modules())
        for name in names:
            if name not in modules:
                raise UsageError(f"feature distillation: the UNet has no stage '{name}'")
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class FeatureMatcher:
    """Pairs student and teacher stages and computes the summed per-sample feature MSE."""

    def __init__(self, teacher_unet: nn.Module, student_unet: nn.Module, only: list[str] | None = None):
        self.pairs = stage_map(teacher_unet, student_unet)
        if only:
            missing = [s for s in only if s not in self.pairs]
            if missing:
                raise UsageError(f"feature distillation: stage '{missing[0]}' is not in both UNets "
                                 f"(matched: {', '.join(self.pairs) or 'none'})")
            self.pairs = {s: self.pairs[s] for s in only}
        self.dropped: dict[str, str] = {}
        self.student_tap = StageTap(student_unet, self.pairs)
        self.teacher_tap = StageTap(teacher_unet, self.pairs.values())

    def per_sample_loss(self) -> torch.Tensor | None:
        s_out, t_out = self.student_tap.pop(), self.teacher_tap.pop()
        total = None
        for s_name, t_name in list(self.pairs.items()):
            if s_name not in s_out or t_name not in t_out:
                continue  # the stage did not run (e.g. a skipped path)
            a, b = s_out[s_name], t_out[t_name]
            if a.shape != b.shape:
                self.dropped[s_name] = f"shape {tuple(a.shape)} vs teacher {tuple(b.shape)}"
                del self.pairs[s_name]
                continue
            term = (a.float() - b.float().detach()).pow(2).flatten(1).mean(1)
            total = term if total is None else total + term
        return total

    def close(self) -> None:
        self.student_tap.close()
        self.teacher_tap.close()
