"""Typed errors. Every error a user can trigger is a :class:`SnapoptError` whose message is one line
naming what is wrong (field, file, value); the CLI prints it and exits non-zero without a traceback."""

from __future__ import annotations


class SnapoptError(Exception):
    """Base of all user-facing errors. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(SnapoptError):
    """Bad input from the user: a recipe field, a CLI argument, a file."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe failed validation before anything ran."""


class ModelRefError(UsageError):
    """A model reference could not be resolved (missing folder, unknown preset, hub unreachable)."""


class TargetError(UsageError):
    """A target plugin or target file is invalid or unknown."""


class PluginError(UsageError):
    """A pass or target plugin was rejected at registration."""


class PassError(SnapoptError):
    """A pass failed. Names the pass and the passes that ran before it."""

    exit_code = 3

    def __init__(self, pass_name: str, message: str, history: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.history = tuple(history)
        after = f" (after {', '.join(self.history)})" if self.history else ""
        super().__init__(f"pass '{pass_name}'{after}: {message}")


class PreconditionError(PassError):
    """The program handed to a pass does not satisfy what the pass requires."""


class PostconditionError(PassError):
    """A pass produced a program that fails verification (does not run, non-finite, not exact)."""


class LoweringError(SnapoptError):
    """Export to Core ML or ONNX failed."""

    exit_code = 4
