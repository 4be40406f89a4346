"""Where a chain's training stages lose time before they reach their steady speed, read from its log.

Every training loop prints a tqdm bar (``NAME:  12%|...| 188/1600 [00:20<01:51, 12.69it/s, ...]``); a chain log
(bench/device/chain.sh writes logs/<name>.log; plain or gzipped) holds them all. Per stage this prints the time to the first step
(pools, CUDA-graph capture, cuDNN tuning), the steady rate (steps/s over the second half of the run), the total,
and the time lost against running every step at the steady rate. A stage that reaches its steady rate late shows
up here: the decoder's teacher images decoded batch by batch cost ~25 s over the first 300 steps.

    python bench/chain_warmup.py bench/results/snapfusion_chain_h200_recipe1200/chain.log.gz [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BAR = re.compile(r"^(?P<name>[^\r\n:|]+?):\s+\d+%\|[^|]*\|\s*(?P<step>\d+)/(?P<total>\d+) \[(?P<t>[\d:]+)")


def _seconds(clock: str) -> int:
    s = 0
    for part in clock.split(":"):
        s = 60 * s + int(part)
    return s


def stages(text: str) -> list[dict]:
    """One entry per progress bar, in order: name, steps, first-step seconds, steady steps/s, total, lost."""
    bars: dict[str, list[tuple[int, int]]] = {}
    order: list[str] = []
    for line in text.replace("\r", "\n").splitlines():
        m = BAR.match(line.strip())
        if not m:
            continue
        name, step, total, t = m["name"].strip(), int(m["step"]), int(m["total"]), _seconds(m["t"])
        if name not in bars:
            order.append(name)
        bars.setdefault(name, []).append((step, t, total))
    out = []
    for name in order:
        pts = bars[name]
        total = pts[-1][2]
        end_step, end_t = max((s, t) for s, t, _ in pts)
        if end_t <= 0 or end_step < 10:
            continue  # a loader's bar (weights, shards): no training loop
        first = next((t for s, t, _ in pts if s >= 1), None)
        mid = min(pts, key=lambda p: abs(p[0] - end_step / 2))
        steady = (end_step - mid[0]) / max(end_t - mid[1], 1e-9) if end_step > mid[0] else None
        ideal = end_step / steady if steady else None
        out.append({"stage": name, "steps": end_step, "of": total, "first_step_s": first, "steady_steps_per_s": steady and round(steady, 1),
                    "seconds": end_t, "lost_s": None if ideal is None else round(end_t - ideal, 1)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not a.log.is_file():
        print(f"error: log '{a.log}' does not exist", file=sys.stderr)
        return 2
    raw = a.log.read_bytes()
    if a.log.suffix == ".gz":
        import gzip

        raw = gzip.decompress(raw)
    rows = stages(raw.decode(errors="replace"))
    if not rows:
        print(f"error: no progress bars in '{a.log}'", file=sys.stderr)
        return 2
    print(f"{'stage':34} {'steps':>9} {'1st step s':>10} {'steady it/s':>11} {'total s':>8} {'lost s':>7}")
    for r in rows:
        print(f"{r['stage'][:34]:34} {r['steps']:>9} {'-' if r['first_step_s'] is None else r['first_step_s']:>10} {r['steady_steps_per_s'] or '-':>11} {r['seconds']:>8} {r['lost_s'] if r['lost_s'] is not None else '-':>7}")
    if a.json:
        a.json.write_text(json.dumps({"log": str(a.log), "stages": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
