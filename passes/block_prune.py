"""``block_prune``: SnapFusion's architecture evolving (arXiv 2306.00980, Algorithm 1).

For every candidate block (attention blocks and channel-preserving ResNets) the pass measures what skipping
it costs in quality (ΔQuality, from an evaluator) and saves in latency on the target (ΔLatency, from the
target's per-block lookup table), and ranks blocks by value = ΔQuality / ΔLatency. It removes the
lowest-value block, re-scores the survivors every ``reevaluate_every`` removals, and stops once the UNet
meets the latency budget. If it then has room, it adds back the highest-value removed block that still
fits (the paper's A+ action; duplicating a block would need training, so it is left to the recovery
trainer). Every evaluation goes into the run report (a table and a plot of ΔQuality against ΔLatency); the
chosen blocks are then removed physically with ``remove_blocks`` (in place, keeping skip connections).

With ``robust_training`` the evaluations are interleaved with training, as in Algorithm 1: before every
scoring round the UNet is distilled from the teacher for ``robust_training.train.steps`` steps, with the
blocks chosen so far skipped and the survivors skipped at random (``robust_training.robust``), so each
round scores a model that has learned to live without what is already gone. ``robust_weights: discard`` uses
that training for the search only and removes the chosen blocks from the weights the pass received.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from snapopt.core import ComponentOptions, Pass, PassContext, PassResult
from snapopt.core.phases import phase
from snapopt.errors import UsageError
from snapopt.train.jobs import RecoverJob


#: SD schedulers train on 1000 timesteps; a model with fewer is checked again at run time
MAX_TIMESTEP = 999


class BlockPruneOptions(ComponentOptions):
    component: Literal["unet"] = "unet"
    target: str | None = Field(None, description="target whose latency table is used (default: the recipe's first)")
    budget_ms: float | None = Field(None, gt=0, description="latency budget per UNet call on the target, ms")
    budget_fraction: float | None = Field(None, gt=0, le=1, description="budget as a fraction of the model's latency before pruning")
    evaluator: Literal["teacher_distance"] = Field("teacher_distance", description="quality metric for ΔQuality")
    prompts: int = Field(4, ge=1, le=64, description="prompts (batch) per evaluation")
    prompt_set: Literal["auto", "validation"] = Field(
        "auto", description="auto: captions of the model's own training distribution where known (zoo:snapshapes: its "
                            "training split), else snapopt.quality.VALIDATION_PROMPTS; validation: always those")
    timesteps: list[int] = Field(default_factory=lambda: [999, 750, 500, 250, 50], min_length=1,
                                 description="diffusion timesteps the evaluator compares outputs at, in [0, num_train_timesteps - 1]")
    kinds: list[Literal["attention", "resnet"]] = Field(default_factory=lambda: ["attention", "resnet"])
    candidates: list[str] = Field(default_factory=list, description="restrict to these blocks (default: every skippable block)")
    reevaluate_every: int = Field(0, ge=0, description="re-score survivors after this many removals (0: rank once)")
    add_back: bool = Field(True, description="A+ action: add back the highest-value removed block while under budget")
    robust_training: RecoverJob | None = Field(
        None, description="Algorithm 1: before each scoring round, train this recover job (train.steps per round) with the "
                          "chosen blocks skipped and the rest skipped at random (robust)")
    robust_weights: Literal["keep", "discard"] = Field(
        "keep", description="keep: the pruned UNet keeps the robust-trained weights (Algorithm 1); discard: robust training "
                            "only guides the search, and the chosen blocks are removed from the weights the pass received "
                            "(its round 0 alone moves the unpruned UNet to teacher distance ~0.12)")

    @field_validator("timesteps")
    @classmethod
    def _timesteps_in_range(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t <= MAX_TIMESTEP]
        if bad:
            raise ValueError(f"timestep {bad[0]} is outside [0, {MAX_TIMESTEP}] (the scheduler's training timesteps)")
        return v

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.budget_ms is None) == (self.budget_fraction is None):
            raise ValueError("give exactly one of budget_ms and budget_fraction")
        return self


class BlockPrune(Pass):
    """Remove the UNet blocks with the least quality per millisecond (ΔQuality/ΔLatency) until a latency budget is met (SnapFusion)."""

    name = "block_prune"
    Options = BlockPruneOptions
    structural = True

    def run(self, program, ctx: PassContext) -> PassResult:
        from snapopt.devices.report import component_table
        from snapopt.models.skipping import skip_blocks, skippable_blocks
        from snapopt.passes.remove_blocks import RemoveBlocks
        from snapopt.quality import TeacherDistance, domain_prompts

        o = self.options
        if program.structure_only:
            raise UsageError("block_prune needs weights to measure quality; load the model without structure_only")
        target = _pick_target(ctx, o.target)
        # the same price the run report prints (snapopt.devices.report.component_table): one number per quantity
        table = component_table(ctx.input_graph(program, "unet"), target)  # the manager's capture of this input
        baseline_ms = table.total_ms
        budget_ms = o.budget_ms if o.budget_ms is not None else o.budget_fraction * baseline_ms
        num_train = _num_train_timesteps(program)
        late = [t for t in o.timesteps if t >= num_train]
        if late:
            raise UsageError(f"block_prune.timesteps: {late[0]} is outside [0, {num_train - 1}] (the model's scheduler "
                             f"has {num_train} training timesteps)")
        if baseline_ms <= budget_ms:  # already within budget (e.g. budget_fraction: 1.0): nothing to remove
            stats = {"target": target.id, "baseline_ms": round(baseline_ms, 2), "budget_ms": round(budget_ms, 2),
                     "final_ms": round(baseline_ms, 2), "removed": [], "added_back": [], "evaluations": 0,
                     "robust_rounds": [], "note": "budget already met; no block removed"}
            ctx.report.setdefault("sections", []).append({"title": "Block pruning (value = ΔQuality / ΔLatency)", "lines": [
                f"Target {target.id}: {stats['baseline_ms']} ms is already within the budget of {stats['budget_ms']} ms; no block removed."]})
            ctx.report.setdefault("block_prune", []).append({"stats": stats, "evaluations": []})
            return PassResult(program, modified=False, stats=stats)
        skippable = {n: k for n, k in skippable_blocks(program.unet).items() if k in o.kinds}
        if o.candidates:
            missing = [c for c in o.candidates if c not in skippable]
            if missing:
                raise UsageError(f"block_prune: '{missing[0]}' is not a skippable {'/'.join(o.kinds)} block")
            skippable = {n: skippable[n] for n in o.candidates}
        texts = domain_prompts(program, o.prompts, ctx.seed) if o.prompt_set == "auto" else None
        evaluator = TeacherDistance.prepare(program, latent=ctx.shapes.latent(program), prompts=o.prompts,
                                            timesteps=tuple(o.timesteps), seed=ctx.seed, texts=texts)
        base_q = evaluator.score(program)
        if o.robust_training is not None and ctx.teacher is None:
            raise UsageError("block_prune: robust_training needs the teacher (PassContext.teacher; snapopt apply sets it)")

        removed: list[str] = []
        log: list[dict] = []
        rounds: list[dict] = []
        data = None  # the robust-training data source, built on the first round
        entering = None  # with robust_weights: discard, the UNet's weights as the pass received them
        if o.robust_training is not None and o.robust_weights == "discard":
            entering = {k: v.detach().to("cpu", copy=True) for k, v in program.unet.state_dict().items()}

        def train_round(round_: int) -> None:
            """Algorithm 1's robust training between evaluations (the blocks chosen so far stay skipped)."""
            nonlocal data
            from snapopt.train import dist
            from snapopt.train.data import LatentSource
            from snapopt.train.jobs import on_device, run_recover

            rt = o.robust_training
            if data is None:  # one data pool for every round (the zoo source renders and encodes thousands of scenes)
                _, device = dist.init(rt.train.device)
                # rendered and encoded where training runs: with the teacher left on the host, the 4096-scene pool
                # took the first ~90 s of the pass on a GPU machine's CPU cores (GPU idle)
                with on_device([ctx.teacher], device):
                    data = LatentSource(ctx.teacher, rt.train.data, seed=rt.train.seed, device=device,
                                        num_train=len(ctx.teacher.scheduler.alphas_cumprod))
            out = ctx.work_dir / f"block_prune-{len(ctx.history)}-round{round_}" if ctx.work_dir is not None else None
            with skip_blocks(program.unet, removed):
                st, _ = run_recover(ctx.teacher, program, rt, out, data=data, title=f"block_prune robust round {round_}")
            rounds.append({"round": round_, "skipped": len(removed), "steps": st["steps"],
                           "teacher_distance_before": st["teacher_distance_before"], "teacher_distance_after": st["teacher_distance_after"],
                           "skip_counts": st["skip_counts"]})

        def evaluate(round_: int) -> dict[str, dict]:
            """Score skipping each surviving candidate on top of what is already removed."""
            if o.robust_training is not None:
                train_round(round_)
            with phase("block scoring"), skip_blocks(program.unet, removed):
                q0 = evaluator.score(program)
            now_us = table.latency_us(_kept(table, removed))
            rows = {}
            for name, kind in skippable.items():
                if name in removed:
                    continue
                with phase("block scoring"), skip_blocks(program.unet, removed + [name]):
                    d_q = evaluator.score(program) - q0
                d_lat = now_us - table.latency_us(_kept(table, removed + [name]))
                rows[name] = {"block": name, "kind": kind, "resolution": table.blocks[name].resolution, "round": round_,
                              "delta_quality": d_q, "delta_latency_ms": d_lat / 1e3,
                              "value": d_q / max(d_lat / 1e3, 1e-6)}
            log.extend(rows.values())
            return rows

        current_ms = baseline_ms
        scores = evaluate(0)
        since = 0
        while current_ms > budget_ms and scores:
            name = min(scores, key=lambda n: scores[n]["value"])
            removed.append(name)
            scores.pop(name)
            current_ms = table.latency_us(_kept(table, removed)) / 1e3
            since += 1
            if o.reevaluate_every and since >= o.reevaluate_every and current_ms > budget_ms:
                scores, since = evaluate(len(removed)), 0
        if current_ms > budget_ms:
            raise UsageError(f"block_prune: budget {budget_ms:.1f} ms on {target.id} not reachable by skipping blocks "
                             f"(best {current_ms:.1f} ms of {baseline_ms:.1f} ms)")
        added_back = []
        if o.add_back:
            chosen = {r["block"]: r for r in log if r["block"] in removed}
            for name in sorted(removed, key=lambda n: -chosen[n]["value"]):
                trial = [r for r in removed if r != name]
                if table.latency_us(_kept(table, trial)) / 1e3 <= budget_ms:
                    removed, added_back = trial, added_back + [name]
            current_ms = table.latency_us(_kept(table, removed)) / 1e3
        if entering is not None:  # the search is done: back to the weights the pass received, then remove
            program.unet.load_state_dict(entering)
        with skip_blocks(program.unet, removed):
            final_q = evaluator.score(program)

        RemoveBlocks({"component": "unet", "blocks": removed, "keep_skips": True}).run(program, ctx)
        stats = {"target": target.id, "baseline_ms": round(baseline_ms, 2), "budget_ms": round(budget_ms, 2),
                 "final_ms": round(current_ms, 2), "baseline_quality": base_q, "final_quality": final_q,
                 "evaluator": evaluator.name, "evaluator_prompts": "the model's training captions" if texts else "VALIDATION_PROMPTS",
                 "removed": removed, "added_back": added_back, "evaluations": len(log),
                 "robust_rounds": rounds, "robust_weights": o.robust_weights if rounds else None}
        _report(ctx, stats, log, removed)
        return PassResult(program, modified=bool(removed), stats=stats,
                          replay_pass="remove_blocks", replay_options={"component": "unet", "blocks": removed, "keep_skips": True})


def _num_train_timesteps(program) -> int:
    sched = getattr(program, "scheduler", None)
    n = getattr(getattr(sched, "config", None), "num_train_timesteps", None) if sched is not None else None
    return int(n) if n else MAX_TIMESTEP + 1


def _kept(table, removed: list[str]) -> list[str]:
    gone = set(removed)
    return [n for n in table.blocks if n not in gone]


def _pick_target(ctx: PassContext, ref: str | None):
    from snapopt.devices.registry import TARGETS

    if ref:
        return TARGETS.resolve(ref)
    if not ctx.targets:
        raise UsageError("block_prune: no target: set options.target or the recipe's targets")
    return ctx.targets[0]


def _report(ctx: PassContext, stats: dict, log: list[dict], removed: list[str]) -> None:
    """Add the value table and a ΔQuality-vs-ΔLatency plot to the run report."""
    lines = [f"Target {stats['target']}: {stats['baseline_ms']} ms → {stats['final_ms']} ms (budget {stats['budget_ms']} ms); "
             f"{stats['evaluator']} {stats['baseline_quality']:.4f} → {stats['final_quality']:.4f}.", "",
             "| round | block | kind | res | ΔQuality | ΔLatency ms | value | removed |", "|---:|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(log, key=lambda r: (r["round"], r["value"])):
        lines.append(f"| {r['round']} | {r['block']} | {r['kind']} | {r['resolution']} | {r['delta_quality']:.4g} | "
                     f"{r['delta_latency_ms']:.3g} | {r['value']:.4g} | {'yes' if r['block'] in removed else ''} |")
    if ctx.work_dir is not None:
        path = ctx.work_dir / "block_prune_value.png"
        _plot(path, log, removed, stats)
        lines = [f"![block value]({path.name})", ""] + lines
    if stats["robust_rounds"]:
        lines += ["", "Robust training between rounds (Algorithm 1):", "",
                  "| round | blocks skipped | steps | teacher distance before → after |", "|---:|---:|---:|---|"]
        lines += [f"| {r['round']} | {r['skipped']} | {r['steps']} | {r['teacher_distance_before']:.4f} → {r['teacher_distance_after']:.4f} |"
                  for r in stats["robust_rounds"]]
    ctx.report.setdefault("sections", []).append({"title": "Block pruning (value = ΔQuality / ΔLatency)", "lines": lines})
    ctx.report.setdefault("block_prune", []).append({"stats": stats, "evaluations": log})


def _plot(path, log, removed, stats) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("attention", "o"), ("resnet", "s")):
        pts = [r for r in log if r["kind"] == kind and r["round"] == 0]
        ax.scatter([r["delta_latency_ms"] for r in pts], [r["delta_quality"] for r in pts], marker=marker, label=kind, alpha=0.7)
    chosen = [r for r in log if r["block"] in removed and r["round"] == 0]
    ax.scatter([r["delta_latency_ms"] for r in chosen], [r["delta_quality"] for r in chosen], s=140, facecolors="none",
               edgecolors="red", label="removed")
    ax.set_xlabel(f"ΔLatency when skipped (ms, {stats['target']})")
    ax.set_ylabel(f"ΔQuality ({stats['evaluator']}, lower is better)")
    ax.set_title("Block value: quality lost per millisecond saved")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
