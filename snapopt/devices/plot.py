"""Bar chart of per-block latency, one bar group per block and one colour per target (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from snapopt.devices.latency import LatencyTable


def plot_tables(tables: list[LatencyTable], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(tables[0].blocks)
    x = np.arange(len(names))
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(names) + 2), 5.0))
    for i, t in enumerate(tables):
        ms = [t.blocks[n].us / 1e3 if n in t.blocks else 0.0 for n in names]
        ax.bar(x + (i - (len(tables) - 1) / 2) * width, ms, width, label=f"{t.target_id} ({t.profile}): {t.total_ms:.0f} ms")
    ax.set_xticks(x)
    ax.set_xticklabels([n.replace("down_blocks", "down").replace("up_blocks", "up").replace("attentions", "attn")
                        .replace("resnets", "res").replace("samplers", "s") for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("predicted latency per call (ms)")
    ax.set_title(title or f"{tables[0].component} per-block latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
