"""What a pass is: a registered name, typed options, and a ``run`` that returns a :class:`PassResult`.

Modelled on torch.fx's pass infra (``PassResult(module, modified)``, requires/call/ensures) and onnx-ir's
(a pass declares whether it is exact; the framework checks it). A pass receives a *copy* of the components
it declares in :meth:`Pass.touches`, so a failing pass leaves the program it was given untouched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from snapopt.models.pipeline import Pipeline


#: bounded option types, shared by passes: a module path, and a latent resolution (SD latents are 8-256)
BlockPath = Annotated[str, Field(min_length=1, max_length=300)]
LatentResolution = Annotated[int, Field(ge=1, le=1024)]
#: most entries an option list may hold (an SD UNet has a few hundred blocks)
MAX_LIST = 2000


class PassOptions(BaseModel):
    """Base of every pass's options: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentOptions(PassOptions):
    """Options of a pass that works on one component."""

    component: str = "unet"


@dataclass
class PassResult:
    """What a pass returns. ``replay_options``: for a structural pass whose options select blocks indirectly
    (by resolution, by importance), the options that name the chosen structure explicitly, so that
    ``snapopt.load`` can rebuild it without the capture or the weights that chose it."""

    program: Pipeline
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    replay_options: dict[str, Any] | None = None
    #: the pass that rebuilds the structure on load, when not this one (block_prune replays as remove_blocks)
    replay_pass: str | None = None


@dataclass
class PassContext:
    """The environment passes run in (TVM-style): shapes, seed, targets and a scratch folder.

    Timing, verification and reporting are done *around* passes by the manager, not inside them."""

    shapes: Any = None
    seed: int = 0
    work_dir: Path | None = None
    targets: list[Any] = field(default_factory=list)
    #: the pipeline as loaded, before any pass: what distillation passes learn from (never mutated)
    teacher: Any = None
    history: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    #: block graph of each component the running pass touches, as the pass receives it (the manager's own
    #: "before" capture), so a pass that selects blocks by resolution need not capture the model again.
    #: Empty outside a PassManager; valid only until the pass changes the component.
    input_graphs: dict[str, Any] = field(default_factory=dict)

    def input_graph(self, program, component: str):
        """``component``'s block graph as the running pass received it: the manager's capture when there is
        one (``input_graphs``), else captured now at ``shapes`` (a pass run on its own)."""
        graph = self.input_graphs.get(component)
        if graph is None:
            from snapopt.capture import block_graph
            from snapopt.errors import UsageError

            if self.shapes is None:
                raise UsageError("block selection by resolution needs the recipe's shapes")
            graph = block_graph(program, component, self.shapes)
        return graph


class Pass:
    """Subclass, set ``name`` and ``Options``, implement :meth:`run`.

    ``exact = True`` promises the rewrite does not change outputs: the manager verifies it within the
    verification tolerance and names the pass if it does not hold."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = ComponentOptions
    exact: ClassVar[bool] = False
    #: a structural pass changes the architecture; its (name, options) are logged so save/load can replay it
    structural: ClassVar[bool] = False

    def __init__(self, options: PassOptions | dict | None = None):
        if isinstance(options, dict) or options is None:
            options = self.Options(**(options or {}))
        self.options = options

    # -- the contract -----------------------------------------------------------------------------------
    def touches(self) -> set[str]:
        """Components this pass may mutate (copied before it runs, verified after)."""
        component = getattr(self.options, "component", None)
        return {component} if component else set()

    def requires(self, program: Pipeline, ctx: PassContext) -> None:
        """Raise :class:`~snapopt.errors.PreconditionError` if ``program`` is not something this pass handles."""

    def run(self, program: Pipeline, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- description ------------------------------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, str, str]]:
        """(name, type, default, description) for each option, for ``snapopt passes``."""
        rows = []
        for name, f in cls.Options.model_fields.items():
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            default = "required" if f.is_required() else repr(f.default)
            rows.append((name, ann, default, f.description or ""))
        return rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
