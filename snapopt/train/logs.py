"""Loss logs: a CSV (one row per logged step, rewritten up to the resume point on resume) and a PNG plot."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def read_csv(path: Path, before_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "step" else float(v)) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if before_step is None or r["step"] < before_step]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` atomically: a kill mid-write leaves the previous log whole, never a truncated one."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: logged columns that are not losses (bookkeeping and per-step indicators)
NOT_LOSSES = ("step", "lr", "seconds", "skipped", "cfg")


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN where none yet)."""
    out, buf = [], []
    for v in values:
        if v == v:  # not NaN
            buf.append(v)
            buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else float("nan"))
    return out


def plot(path: Path, rows: list[dict], title: str) -> Path | None:
    """Every loss column against the step, log-scaled; None when there is nothing to plot."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k not in NOT_LOSSES]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 40)
    for i, k in enumerate(keys):
        vals = [r.get(k, float("nan")) for r in rows]
        color = f"C{i}"
        if window > 1:  # per-step losses jump with the drawn timesteps (and CFG steps): show the trend too
            ax.plot(steps, vals, color=color, lw=0.6, alpha=0.25)
            ax.plot(steps, moving_mean(vals, window), color=color, lw=1.4, label=f"{k} (mean of {window})")
        else:
            ax.plot(steps, vals, color=color, lw=1.2, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
