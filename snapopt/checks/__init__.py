"""Input checks that run before any work starts: recipe and spec files, model folders, output folders.

Every failure is a :class:`~snapopt.errors.UsageError` (exit 2) whose one line names the file, field or
value. These functions are cheap (no model is built or loaded) except where a docstring says otherwise,
so the CLI calls them all before the first stage prints.
"""

from snapopt.checks.files import load_json_file, load_yaml_file, read_text_file
from snapopt.checks.output import check_output_dir, cleanup_stale_runs, estimate_output_bytes, run_lock

__all__ = ["check_output_dir", "cleanup_stale_runs", "estimate_output_bytes", "load_json_file", "load_yaml_file",
           "read_text_file", "run_lock"]
