"""Tables and plots of the training results in bench/results (written by the GPU runs in docs/training.md).

    python bench/training_summary.py      # prints markdown tables, writes docs/img/training_*.png

Reads only JSON already in the repository, so it runs anywhere in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
IMG = ROOT / "docs" / "img"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def zoo_row(label: str, z: dict) -> tuple:
    return (label, z["steps"], z["fid"], z["clip_score"], 100 * z["attribute_accuracy"])


def table(header: list[str], rows: list[tuple]) -> str:
    def cell(v):
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def step_distill_rows() -> list[tuple]:
    cfg, van = load("step_distill_16_8_cfg_h100.json")["stats"], load("step_distill_16_8_vanilla_h100.json")["stats"]
    rows = [zoo_row("teacher, 16 steps", cfg["zoo_teacher_n"]), zoo_row("teacher, 8 steps", cfg["zoo_teacher_half"]),
            zoo_row("vanilla step-distilled student, 8 steps", van["zoo_student_half"]),
            zoo_row("CFG-aware step-distilled student, 8 steps", cfg["zoo_student_half"])]
    for n, label in (("vanilla", "vanilla"), ("cfg", "CFG-aware")):
        f = RESULTS / f"step_distill_16_8_{n}_outputmse_h100.json"
        if f.is_file():
            rows.append(zoo_row(f"{label}, output-space MSE (ablation), 8 steps", json.loads(f.read_text())["stats"]["zoo_student_half"]))
    return rows


def throughput_rows() -> list[tuple]:
    rows = []
    for b in (8, 16, 32):
        f = RESULTS / f"distill_throughput_b{b}.json"
        if f.is_file():
            r = json.loads(f.read_text())["runs"]
            rows.append((b, r["snapopt_trainer_bf16_kd_ema"]["images_per_s"], 100 * r["snapopt_trainer_bf16_kd_ema"]["mfu"],
                         r["plain_eager_bf16"]["images_per_s"], 100 * r["plain_eager_bf16"]["mfu"],
                         r["plain_eager_fp32"]["images_per_s"], 100 * r["plain_eager_fp32"]["mfu"]))
    return rows


def plot_step_distill(rows: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r[0].replace(" step-distilled student", "").replace(", 8 steps", " (8)").replace(", 16 steps", " (16)") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, col, name, better in zip(axes, (2, 3, 4), ("FID (eval CLIP), lower is better", "CLIP score", "attribute accuracy, %"), ("low", "high", "high")):
        vals = [r[col] for r in rows]
        colors = ["0.35", "0.7"] + [f"C{i}" for i in range(len(rows) - 2)]
        ax.barh(range(len(rows)), vals, color=colors)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=10)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("zoo:snapshapes, 64 held-out prompts, CFG 7.5, DDIM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(rows: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for col, label in ((1, "snapopt trainer (bf16, KD, EMA)"), (3, "plain eager loop, bf16"), (5, "plain eager loop, fp32")):
        ax.plot(batches, [r[col] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (512 px)")
    ax.set_ylabel("images / s")
    ax.set_title("SD-v1.5 teacher -> BK-SDM-Small student, one H100")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    rec = load("recover_bk_small_snapshapes_h100.json")["stats"]
    print("## Recovery (BK-SDM-Small-style student of zoo:snapshapes)\n")
    print(table(["model", "steps", "FID", "CLIP", "attributes %"],
                [zoo_row("teacher", rec["zoo_teacher"]), zoo_row("student before recovery", rec["zoo_before"]),
                 zoo_row("student after recovery", rec["zoo_after"])]))
    dec = load("decoder_50_snapshapes_h100.json")["stats"]
    print(f"\n## Decoder distillation: PSNR vs teacher decoder {dec['psnr_before_db']:.1f} -> {dec['psnr_after_db']:.1f} dB\n")
    sd = step_distill_rows()
    print("## Step distillation 16 -> 8\n")
    print(table(["model", "steps", "FID", "CLIP", "attributes %"], sd))
    tp = throughput_rows()
    print("\n## Distillation throughput (SD-v1.5 -> BK-SDM-Small, H100)\n")
    print(table(["batch", "snapopt img/s", "MFU %", "plain bf16 img/s", "MFU %", "plain fp32 img/s", "MFU %"], tp))
    IMG.mkdir(parents=True, exist_ok=True)
    plot_step_distill(sd, IMG / "training_step_distill.png")
    if tp:
        plot_throughput(tp, IMG / "training_throughput.png")
    print(f"\nwrote {IMG / 'training_step_distill.png'} and {IMG / 'training_throughput.png'}")


if __name__ == "__main__":
    main()
