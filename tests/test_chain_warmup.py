"""bench/chain_warmup.py reads a chain log's progress bars into first-step time, steady rate and time lost."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import chain_warmup  # noqa: E402


def _bar(name, step, total, t):
    return f"{name}:  {100 * step // total}%|##| {step}/{total} [{t // 60:02d}:{t % 60:02d}<00:10, 5.00it/s, loss=0.1]"


def test_slow_start_is_counted_as_lost_time(tmp_path):
    # 100 steps: the first at 10 s, then 1 step/s until step 20, then 10 steps/s
    lines = [_bar("Loading weights", 68, 68, 0), _bar("decoder_distill", 0, 100, 0), _bar("decoder_distill", 1, 100, 10)]
    lines += [_bar("decoder_distill", s, 100, 10 + (s - 1)) for s in range(2, 21)]
    lines += [_bar("decoder_distill", s, 100, 29 + (s - 20) // 10) for s in range(21, 100)]
    lines.append(_bar("recover", 50, 50, 5))
    (row, rec) = chain_warmup.stages("\r".join(lines))  # tqdm writes carriage returns; the loader's bar is skipped
    assert row["stage"] == "decoder_distill" and row["first_step_s"] == 10 and row["steps"] == 99
    assert 9 <= row["steady_steps_per_s"] <= 11 and row["seconds"] == 36 and 25 <= row["lost_s"] <= 28
    assert rec["stage"] == "recover" and rec["steps"] == 50
    log = tmp_path / "chain.log.gz"
    log.write_bytes(gzip.compress("\n".join(lines).encode()))
    assert chain_warmup.main([str(log), "--json", str(tmp_path / "w.json")]) == 0 and (tmp_path / "w.json").is_file()
    assert chain_warmup.main([str(tmp_path / "missing.log")]) == 2
