"""``snapopt check apple EXPORT_DIR``: verify a Core ML export against what Apple's Swift pipeline expects."""

from __future__ import annotations

from pathlib import Path

import typer

check_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Check exports against a runtime's expectations.")


@check_app.callback()
def _group():
    """Check exports against a runtime's expectations."""


@check_app.command("apple")
def apple(export_dir: Path = typer.Argument(..., help="run folder, its exports/ folder, or a Core ML resources folder"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="list every check that passed")):
    """Names, shapes, dtypes, channels, files and tokenization as Apple's ml-stable-diffusion Swift pipeline reads them.
    Exit 0 when it conforms, 4 when it does not (each problem on one line)."""
    from rich.console import Console

    from snapopt.errors import LoweringError
    from snapopt.lowering.apple_check import check_apple, find_resources

    console = Console()
    folder = find_resources(export_dir)
    problems, checks = check_apple(folder)
    if verbose:
        for c in checks:
            console.print(f"ok  {c}", markup=False, highlight=False)
    for p in problems:
        console.print(f"FAIL {p}", markup=False, highlight=False)
    if problems:
        raise LoweringError(f"{folder}: {len(problems)} problem(s) for Apple's Swift pipeline; first: {problems[0]}")
    console.print(f"{folder}: conforms to Apple's Swift pipeline ({len(checks)} checks passed)", markup=False, highlight=False)
