"""Plot the zoo training loss curves (docs/img/zoo_loss_*.png) from the trainer.json histories.

    PYTHONPATH=. python bench/zoo_loss_curves.py --workdir .zoo_work
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {"clip": "conditioning CLIP (contrastive)", "evalclip": "evaluation CLIP (contrastive)",
          "vae": "VAE (L1 + MSE + KL)", "unet": "UNet (epsilon MSE)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(".zoo_work"))
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (stage, title) in zip(axes, TITLES.items()):
        state = json.loads((a.workdir / stage / "trainer.json").read_text())
        hist = state["history"]
        ax.plot([h[0] for h in hist], [h[1] for h in hist])
        for run in state["runs"][1:]:
            ax.axvline(run.get("start", 0), color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step (dotted: resumed run)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(a.out / "zoo_loss_curves.png", dpi=110)
    print(f"saved {a.out / 'zoo_loss_curves.png'}")


if __name__ == "__main__":
    main()
