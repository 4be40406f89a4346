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


class Interrupted(SnapoptError):
    """The user interrupted the run (Ctrl-C / SIGINT)."""

    exit_code = 130


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM: ``kill``, a scheduler, torchrun tearing down): 128 + 15.
    A BaseException like KeyboardInterrupt, so no ``except Exception`` on the way up swallows it."""

    exit_code = 143


#: signals whose exception was raised but may have been swallowed on the way up (see :func:`raise_pending_signal`)
_PENDING: list[BaseException] = []


def raise_on_sigterm() -> None:
    """Turn SIGTERM into an exception, so cleanup (``finally``, run.apply's work folder) runs as it does for
    Ctrl-C, and remember both signals: Python raises a signal's exception in whatever frame runs, and one that
    lands in a ``__del__`` or a library callback is printed and dropped, so the run would go on and exit 0.
    Long work calls :func:`raise_pending_signal` between stages to raise it again. Only in the main thread, and
    only where the handlers are still Python's defaults."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _quiet_swallowed_signals()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        def on_term(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
            exc = Terminated("terminated (SIGTERM)")
            _PENDING.append(exc)
            raise exc

        signal.signal(signal.SIGTERM, on_term)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        def on_int(signum, frame):
            exc = KeyboardInterrupt()
            _PENDING.append(exc)
            raise exc

        signal.signal(signal.SIGINT, on_int)


def _quiet_swallowed_signals() -> None:
    """Keep Python's "Exception ignored in ... Traceback" report of a signal exception dropped in a ``__del__``
    or weakref callback off the user's terminal (torch.export runs many): the exception is in ``_PENDING`` and
    :func:`raise_pending_signal` raises it at the next stage, so the run still ends with its one line.
    Every other unraisable exception goes to the hook that was there before."""
    import sys

    if getattr(sys.unraisablehook, "_snapopt_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if any(unraisable.exc_value is exc for exc in _PENDING):
            return
        previous(unraisable)

    hook._snapopt_quiet = True
    sys.unraisablehook = hook


def raise_pending_signal() -> None:
    """Raise again a SIGINT/SIGTERM whose exception something swallowed (called at stage boundaries)."""
    if _PENDING:
        raise _PENDING.pop()


# ---- the one exit-code discipline -----------------------------------------------------------------------
#: every exit status a snapopt command can return, and what it means
EXIT_CODES = {0: "success", 1: "internal error (a bug: set SNAPOPT_DEBUG=1 for the traceback)",
              2: "bad input: recipe, argument, file, model reference or plugin", 3: "a pass failed (named)",
              4: "lowering (Core ML / ONNX export) failed", 130: "interrupted (Ctrl-C)", 143: "terminated (SIGTERM)"}


def _click_classes(name: str) -> tuple[type, ...]:
    """``name`` from every click the installed typer may use: click itself, and typer>=0.26's vendored copy."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return "; ".join(lines) if lines else ""


def run_cli(invoke, *, prog: str = "snapopt", echo=None) -> int:
    """Run ``invoke()`` (a click/typer command's ``main(..., standalone_mode=False)``) and map whatever
    happens to one exit status and at most one line on stderr. This is the only place exit codes are
    decided: 0 success · 1 internal · 2 bad input (incl. every click usage error) · 3 pass · 4 lowering ·
    130 interrupted. A command's integer return value is its exit status (never dropped)."""
    import os
    import sys

    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    debug = bool(os.environ.get("SNAPOPT_DEBUG"))
    _PENDING.clear()
    try:
        rv = invoke()
    except SnapoptError as exc:
        if debug:
            raise
        say(f"error: {_one_line(exc)}" if exc.exit_code != 130 else f"interrupted: {_one_line(exc)}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted (Ctrl-C)")
        return 130
    except Terminated:
        say("terminated (SIGTERM)")
        return Terminated.exit_code
    except BrokenPipeError:  # `snapopt passes | head`: the reader left; not an error worth a message
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        say(f"error: {_one_line(code)}")
        return 1
    except Exception as exc:
        if isinstance(exc, _click_classes("Exit")):
            rv = getattr(exc, "exit_code", 0)
        elif isinstance(exc, _click_classes("Abort")):  # click turns Ctrl-C / EOF on a prompt into Abort
            say("interrupted (Ctrl-C)")
            return 130
        elif isinstance(exc, _click_classes("NoArgsIsHelpError")):  # bare `snapopt`: help, then click's usage status
            exc.show()
            return 2
        elif isinstance(exc, _click_classes("ClickException")):
            message = _one_line(exc.format_message())
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            say(f"error: {message}{hint}")
            return 2  # every click error is about the command line: bad input
        else:
            if debug:
                raise
            say(f"internal error: {exc.__class__.__name__}: {_one_line(exc)} (set SNAPOPT_DEBUG=1 for the traceback)")
            return 1
    if isinstance(rv, int) and not isinstance(rv, bool):
        if rv == 130:
            say("interrupted (Ctrl-C)")
        return rv
    return 0
