"""Runs a recipe's passes in order, verifying and measuring the program after each one.

A pass manager is itself pass-like: ``run(program) -> (program, records)``. For every pass it copies the
components the pass touches (so a failure leaves the input untouched), runs it, checks the result still runs
at the recipe's shapes with finite outputs (and, for an exact pass, reproduces the previous outputs within
tolerance), and records what changed: parameters, MACs and blocks, from a fresh capture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from snapopt.capture import block_graph
from snapopt.core.pass_base import Pass, PassContext, PassResult
from snapopt.core.verify import check_finite, compare, run_component
from snapopt.core.phases import recording
from snapopt.errors import ModelRefError, PassError, PostconditionError, PreconditionError, SnapoptError
from snapopt.models.pipeline import Pipeline
from snapopt.serialization import record_edit, remember_base_config


@dataclass
class ComponentStats:
    params: int
    macs: int
    blocks: list[str]

    @classmethod
    def of(cls, g) -> "ComponentStats":
        return cls(params=g.total_params, macs=g.totals()["macs"], blocks=[b for b in g.blocks() if g.node(b)["kind"] != "other"])


@dataclass
class PassRecord:
    """What one pass did: the table row of the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    exact: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    #: where ``seconds`` went: named phases (snapopt.core.phases), seconds each; the rest is unnamed work
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "exact": self.exact, "options": self.options, "modified": self.modified, "seconds": round(self.seconds, 3),
                "phases": self.phases, "stats": self.stats, "changes": self.changes, "verification": self.verification}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PassRecord":
        """The record :meth:`to_json` wrote (a resumed run's finished passes come back from its journal)."""
        return cls(name=data["pass"], options=data["options"], modified=data["modified"], seconds=data["seconds"],
                   exact=data["exact"], stats=data["stats"], changes=data["changes"], verification=data["verification"],
                   phases=data.get("phases", {}))


class PassManager:
    def __init__(self, passes: list[Pass], ctx: PassContext, *, tolerance: float = 1e-4, verify: bool = True,
                 on_pass: Callable[[int, Pass], None] | None = None, graphs: dict | None = None,
                 persist: Callable[[int, Pass, Pipeline, list[str]], Pipeline] | None = None,
                 on_done: Callable[[int, Pass, Pipeline, list["PassRecord"]], None] | None = None):
        self.passes = passes
        self.ctx = ctx
        self.tolerance = tolerance
        self.verify = verify
        self.on_pass = on_pass
        #: called as soon as a pass returns, with the owner attributes it modified; returns the program to go on
        #: with. ``snapopt apply`` saves the result there and continues from its reload, so a resumed run
        #: continues from exactly what an uninterrupted one did; capture and verification check what it returns
        self.persist = persist
        #: called once a pass is verified and recorded (``snapopt apply`` commits its journal there)
        self.on_done = on_done
        #: latest block graph per component: a pass's "after" capture is the next pass's "before"
        self.graphs: dict = dict(graphs or {})

    def graph(self, program: Pipeline, component: str):
        if component not in self.graphs:
            self.graphs[component] = block_graph(program, component, self.ctx.shapes)
        return self.graphs[component]

    def run(self, program: Pipeline, *, done: list[PassRecord] | None = None) -> tuple[Pipeline, list[PassRecord]]:
        """Run the passes in order. ``done``: records of passes already finished (a resumed run): those passes
        are skipped, ``program``, ``ctx.history`` and ``graphs`` being their result."""
        records = list(done or [])
        for i, p in enumerate(self.passes):
            if i < len(records):
                continue
            if self.on_pass:
                self.on_pass(i, p)
            program, record = self.run_one(p, program, index=i)
            records.append(record)
            self.ctx.history.append(p.name)
            if self.on_done:
                self.on_done(i, p, program, records)
        return program, records

    def run_one(self, p: Pass, program: Pipeline, *, index: int | None = None) -> tuple[Pipeline, PassRecord]:
        history = tuple(self.ctx.history)
        shapes = self.ctx.shapes
        touched = sorted(p.touches())
        for comp in touched:
            if comp not in program.components():
                raise PreconditionError(p.name, f"model has no component '{comp}'", history)
        can_run = not program.structure_only
        before_stats = {c: ComponentStats.of(self.graph(program, c)) for c in touched}
        # outputs before the pass: exact passes must reproduce them, lossy ones report how far they moved
        before_out = {c: run_component(program, c, shapes, self.ctx.seed) for c in touched} if (self.verify and can_run) else {}
        for comp, out in before_out.items():
            problem = check_finite(out)
            if problem and not history:  # the model as loaded is broken: bad input, not this pass's fault
                raise ModelRefError(f"input model '{program.source}': {problem} at the recipe's shapes, before any pass ran")
            if problem:
                raise PreconditionError(p.name, f"input to this pass: {problem}", history)
        untouched = sorted({program.owner_attr(c) for c in program.components()} - {program.owner_attr(c) for c in touched})
        fingerprints = {attr: _fingerprint(getattr(program, attr)) for attr in untouched}

        start = time.perf_counter()
        candidate = program.clone(touched)
        owners = {candidate.owner_attr(c) for c in touched}
        if p.structural:
            for attr in owners:
                remember_base_config(getattr(candidate, attr))
        self.ctx.input_graphs = {c: self.graphs[c] for c in touched}  # candidate is a clone: same graph
        try:
            p.requires(candidate, self.ctx)
            with recording() as phases:
                result = p.run(candidate, self.ctx)
        except PassError:
            raise
        except SnapoptError as exc:
            raise PreconditionError(p.name, str(exc), history) from None
        except Exception as exc:
            raise PassError(p.name, f"{exc.__class__.__name__}: {exc}", history) from exc
        finally:
            self.ctx.input_graphs = {}
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassError(p.name, f"run() must return a PassResult, got {type(result).__name__}", history)
        new = result.program
        for attr in untouched:  # a pass gets copies of what it declared; anything else it changed was the teacher's
            if getattr(new, attr) is not getattr(program, attr) or _fingerprint(getattr(program, attr)) != fingerprints[attr]:
                raise PassError(p.name, f"modified '{attr}', which it did not declare in touches() (declared: "
                                f"{', '.join(touched) or 'nothing'})", history)

        if p.structural and result.modified:
            for attr in owners:
                record_edit(getattr(new, attr), result.replay_pass or p.name, result.replay_options or p.options.model_dump(mode="json"))
        if self.persist is not None:
            new = self.persist(len(history) if index is None else index, p, new, sorted(owners) if result.modified else [])
        verification: dict[str, Any] = {}
        after_stats, after_graphs = {}, {}
        for comp in touched:
            try:
                after_graphs[comp] = block_graph(new, comp, shapes)  # re-capture: the graph must still export
            except SnapoptError as exc:
                raise PostconditionError(p.name, f"result no longer captures: {exc}", history) from None
            after_stats[comp] = ComponentStats.of(after_graphs[comp])
            if self.verify and can_run:
                try:
                    out = run_component(new, comp, shapes, self.ctx.seed)
                except Exception as exc:
                    raise PostconditionError(p.name, f"component '{comp}' no longer runs at the recipe's shapes: {exc}", history) from None
                problem = check_finite(out)
                if problem:
                    raise PostconditionError(p.name, problem, history)
                entry: dict[str, Any] = {"runs": True, "finite": True}
                err = compare(before_out[comp], out)
                entry["relative_error"] = err
                if p.exact:
                    if not err <= self.tolerance:
                        raise PostconditionError(
                            p.name, f"declared exact but changed '{comp}' outputs by relative error {err:.3g} > {self.tolerance:g}", history)
                verification[comp] = entry
            else:
                verification[comp] = {"runs": "not checked (structure-only model)", "captures": True}

        changes = {}
        for comp in touched:
            b, a = before_stats[comp], after_stats[comp]
            changes[comp] = {
                "params_before": b.params, "params_after": a.params,
                "macs_before": b.macs, "macs_after": a.macs,
                "blocks_before": len(b.blocks), "blocks_after": len(a.blocks),
                # names, not identities: a removed layer re-indexes its siblings (see the pass's own stats)
                "names_gone": [x for x in b.blocks if x not in a.blocks],
                "names_new": [x for x in a.blocks if x not in b.blocks],
            }
        self.graphs.update(after_graphs)
        record = PassRecord(name=p.name, exact=p.exact, options=p.options.model_dump(mode="json"), modified=result.modified,
                            seconds=seconds, stats=result.stats, changes=changes, verification=verification, phases=phases)
        return new, record


def _fingerprint(module) -> tuple:
    """What a pass may not change behind the manager's back: every parameter by identity and in-place version
    (``mul_``, ``copy_``, optimizer steps bump it), every buffer by value. Buffers are compared by value because
    ``Module.to`` replaces them with new tensors, so a module moved to a GPU and back (a training pass running its
    teacher there) has new buffer ids and unchanged contents; buffers are small (position ids, norm statistics)."""
    if module is None:
        return ()
    params = tuple((name, id(t), t._version) for name, t in module.named_parameters())
    buffers = tuple((name, tuple(t.shape), str(t.dtype), _content(t)) for name, t in module.named_buffers())
    return params + buffers


def _content(t) -> int:
    import hashlib

    import torch

    data = t.detach().cpu().contiguous()
    return int.from_bytes(hashlib.blake2b(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"",
                                          digest_size=8).digest(), "little")
