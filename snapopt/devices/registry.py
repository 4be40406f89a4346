"""Target discovery: the ``snapopt.targets`` entry-point group (built-ins included) and YAML files.

An entry point may point at a :class:`Target`, a path to a target YAML file, or a callable returning either.
YAML files are used directly by path (``--target ./my-phone.yaml``) or listed for discovery in
``SNAPOPT_TARGETS_PATH`` (files or folders of ``*.yaml``, separated like ``PATH``), so ``snapopt targets``
shows them too. See docs/adding-an-iphone.md.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

from snapopt.devices.target import Target, load_target_file
from snapopt.errors import PluginError, TargetError

GROUP = "snapopt.targets"
PATH_VARIABLE = "SNAPOPT_TARGETS_PATH"


class TargetRegistry:
    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._sources: dict[str, str] = {}
        self._loaded = False

    def register(self, obj: object, source: str, expected_id: str | None = None) -> Target:
        if callable(obj) and not isinstance(obj, (Target, Path, str)):
            obj = obj()
        if isinstance(obj, (str, Path)):
            obj = load_target_file(obj)
        if not isinstance(obj, Target):
            raise PluginError(f"target plugin {source} is not a Target, a YAML path, or a callable returning one: {obj!r}")
        if expected_id is not None and obj.id != expected_id:
            raise PluginError(f"target plugin {source}: entry point name '{expected_id}' differs from the target's id '{obj.id}'")
        if obj.id in self._targets and self._sources[obj.id] != source:
            raise PluginError(f"target id '{obj.id}' from {source} is already registered by {self._sources[obj.id]}")
        self._targets[obj.id] = obj
        self._sources[obj.id] = source
        return obj

    def load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=GROUP):
            source = f"entry point '{ep.name}' ({ep.dist.name if ep.dist else '?'})"
            try:
                obj = ep.load()
            except Exception as exc:
                raise PluginError(f"cannot load target plugin {source}: {exc}") from None
            self.register(obj, source, expected_id=ep.name)
        for entry in filter(None, os.environ.get(PATH_VARIABLE, "").split(os.pathsep)):
            path = Path(entry).expanduser()
            if not path.exists():
                raise TargetError(f"{PATH_VARIABLE}: '{entry}' does not exist")
            for f in sorted(path.glob("*.y*ml")) if path.is_dir() else [path]:
                self.register(load_target_file(f), f"file {f.resolve()}")

    def resolve(self, ref: str) -> Target:
        """A target by registered id, or from a YAML file path (registered under its id).

        ``<id>@<profile>`` selects one of the target's other deployment profiles."""
        self.load_entry_points()
        if "@" in ref and not Path(ref).is_file():
            base, _, profile = ref.rpartition("@")
            return self.resolve(base).with_profile(profile)
        if ref in self._targets:
            return self._targets[ref]
        if ref.endswith((".yaml", ".yml")) or Path(ref).is_file():
            target = load_target_file(ref)
            return self.register(target, f"file {Path(ref).resolve()}")
        raise TargetError(f"unknown target '{ref}'; known: {', '.join(sorted(self._targets))} (or a target .yaml path)")

    def source(self, target_id: str) -> str:
        self.load_entry_points()
        return self._sources.get(target_id, "?")

    def items(self) -> list[tuple[str, Target, str]]:
        self.load_entry_points()
        return [(i, self._targets[i], self._sources[i]) for i in sorted(self._targets)]


TARGETS = TargetRegistry()
