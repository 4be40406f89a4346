"""Plugin discovery for passes and targets (pytest/pluggy style).

Built-ins are found through the same entry-point groups as third-party plugins (``snapopt.passes``,
``snapopt.targets``). Passes can also come from ``module:Class`` or from a local ``.py`` file; a bad plugin
is rejected at registration with a message naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import BaseModel

from snapopt.core.pass_base import Pass
from snapopt.errors import PluginError

PASS_GROUP = "snapopt.passes"
TARGET_GROUP = "snapopt.targets"


class PassRegistry:
    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}
        self._sources: dict[str, str] = {}
        self._loaded_entry_points = False
        self._broken: dict[str, str] = {}

    # -- registration -----------------------------------------------------------------------------------
    def register(self, cls: object, source: str) -> type[Pass]:
        """Validate and add a pass class; ``source`` says where it came from (for messages and listings).
        Built-ins are registered first (see :meth:`load_entry_points`), so no plugin can take their names."""
        validate_pass_class(cls, source)
        existing = self._passes.get(cls.name)
        if existing is not None and existing is not cls:
            kind = "built-in pass" if self._sources[cls.name].endswith("(snapopt)") else "pass"
            raise PluginError(f"pass plugin from {source} uses the name '{cls.name}' of the {kind} registered by "
                              f"{self._sources[cls.name]}; rename it")
        self._passes[cls.name] = cls
        self._sources[cls.name] = source
        return cls

    def load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        # A broken plugin is rejected by name; it must not take the other passes down with it, so the
        # error is kept and raised when (and only when) that pass is asked for.
        # snapopt's own entry points first: a third-party plugin cannot take a built-in's name
        eps = sorted(entry_points(group=PASS_GROUP), key=lambda ep: (not _is_builtin(ep), ep.name))
        for ep in eps:
            source = f"entry point '{ep.name} = {ep.value}' ({ep.dist.name if ep.dist else 'unknown dist'})"
            try:
                cls = ep.load()
                if getattr(cls, "name", None) != ep.name:
                    raise PluginError(f"pass plugin {source}: entry point name must equal the class's name '{getattr(cls, 'name', None)}'")
                self.register(cls, source)
            except PluginError as exc:
                self._broken[ep.name] = str(exc)
            except BaseException as exc:  # noqa: BLE001 - a plugin raising SystemExit/KeyboardInterrupt on import is broken, not fatal
                self._broken[ep.name] = f"cannot load pass plugin {source}: {exc.__class__.__name__}: {exc}"

    def load_spec(self, spec: str, base_dir: Path | None = None) -> type[Pass]:
        """Register passes from ``module:Class``, ``file.py``, or ``file.py:Class``; return the pass named."""
        self.load_entry_points()  # built-ins first, always
        path_part, _, attr = spec.partition(":") if not _is_windows_path(spec) else (spec, "", "")
        if path_part.endswith(".py"):
            path = Path(path_part)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                found_file = path.is_file()
            except OSError as exc:
                raise PluginError(f"pass file '{path_part[:80]}': {exc.strerror or exc.__class__.__name__}") from None
            if not found_file:
                raise PluginError(f"pass file '{path_part[:200]}' not found")
            module = _import_file(path)
            source = f"file {path_part}"
        else:
            if not path_part or not all(p.isidentifier() for p in path_part.split(".")):
                raise PluginError(f"'{spec[:80]}' is neither 'module:Class' nor a .py file")
            try:
                module = importlib.import_module(path_part)
            except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt from a plugin's import is a bad plugin
                raise PluginError(f"cannot import pass module '{path_part}': {exc.__class__.__name__}: {exc}") from None
            source = f"module {spec}"
        if attr:
            cls = getattr(module, attr, None)
            if cls is None:
                raise PluginError(f"{source}: no attribute '{attr}'")
            return self.register(cls, source)
        found = [obj for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, Pass) and obj is not Pass and obj.__module__ == module.__name__]
        if not found:
            raise PluginError(f"{source} defines no Pass subclass")
        for cls in found:
            self.register(cls, source)
        return found[0] if len(found) == 1 else found[-1]

    # -- lookup -----------------------------------------------------------------------------------------
    def get(self, name: str) -> type[Pass]:
        self.load_entry_points()
        if name in self._broken and name not in self._passes:
            raise PluginError(self._broken[name])
        try:
            return self._passes[name]
        except KeyError:
            raise PluginError(f"unknown pass '{name}'; known: {', '.join(sorted(self._passes))}") from None

    def resolve(self, ref: str, base_dir: Path | None = None) -> type[Pass]:
        """A pass by registered name, ``module:Class`` or ``path.py[:Class]``."""
        self.load_entry_points()
        if ref in self._passes:
            return self._passes[ref]
        if ":" in ref or ref.endswith(".py"):
            return self.load_spec(ref, base_dir)
        return self.get(ref)

    def items(self) -> list[tuple[str, type[Pass], str]]:
        self.load_entry_points()
        return [(n, self._passes[n], self._sources[n]) for n in sorted(self._passes)]

    def broken(self) -> dict[str, str]:
        """Plugins that failed to load, with why (shown by ``snapopt passes``)."""
        self.load_entry_points()
        return dict(self._broken)


def validate_pass_class(cls: object, source: str) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Pass)):
        raise PluginError(f"pass plugin from {source} is not a snapopt Pass subclass: {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise PluginError(f"pass plugin {cls.__name__} from {source} needs a 'name' that is an identifier, got {cls.name!r}")
    if not (inspect.isclass(cls.Options) and issubclass(cls.Options, BaseModel)):
        raise PluginError(f"pass plugin '{cls.name}' from {source}: Options must be a pydantic model (subclass PassOptions)")
    if cls.run is Pass.run:
        raise PluginError(f"pass plugin '{cls.name}' from {source} does not implement run()")


def _import_file(path: Path):
    name = f"snapopt_user_pass_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt from a plugin's import is a bad plugin
        del sys.modules[name]
        raise PluginError(f"cannot import pass file '{path}': {exc.__class__.__name__}: {exc}") from None
    return module


def _is_builtin(ep) -> bool:
    return bool(ep.dist and ep.dist.name == "snapopt")


def _is_windows_path(spec: str) -> bool:
    return len(spec) > 2 and spec[1] == ":" and spec[2] in "\\/"


#: The process-wide registry the CLI and recipes use.
PASSES = PassRegistry()
