"""Memory fit of full-size SD-v1.5 per iPhone (snapopt/devices/memory.py), against what Apple published.

Apple's ml-stable-diffusion README (SD-v1.5, 6-bit palettized, SPLIT_EINSUM_V2, iOS 17) marks the iPhones on which
it had to enable ``reduceMemory`` (models loaded just in time): iPhone 12 mini and iPhone 13 (4 GB) — and not
iPhone 12 Pro Max, 13 Pro Max, 14 and 14 Pro Max (6 GB). This script prints snapopt's prediction for the same
deployments (and fp16) and whether it agrees.

    python bench/lowering_memory_fit.py
writes bench/results/lowering_memory_fit_sd-v1.5.json.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: iPhone -> Apple used reduceMemory for SD-v1.5 6-bit (README, "With Memory Improvements" table)
APPLE_REDUCE_MEMORY = {"iphone-12-mini": True, "iphone-13": True, "iphone-12-pro-max": False, "iphone-13-pro-max": False,
                       "iphone-14": False, "iphone-14-pro-max": False}


def main() -> None:
    from snapopt.devices.memory import memory_report
    from snapopt.devices.registry import TARGETS
    from snapopt.lowering.interfaces import Shapes
    from snapopt.models.loading import load_model

    pipe = load_model("arch:sd-v1.5", components=("unet", "vae", "text_encoder"), structure_only=True)
    shapes = Shapes(resolution=pipe.resolution, batch=2)
    targets = [TARGETS.resolve(f"{t}@apple-split-einsum-v2-6bit") for t in APPLE_REDUCE_MEMORY]
    out = {"model": pipe.source, "resolution": pipe.resolution, "schemes": {}}
    for bits in (6.0, 16.0):
        rep, lines = memory_report(pipe, shapes, targets, bits)
        rows = []
        for r in rep["targets"]:
            predicted_jit = not r["fits_resident"]
            rows.append(r | {"apple_used_reduce_memory": APPLE_REDUCE_MEMORY[r["target"]],
                             "agrees_with_apple": predicted_jit == APPLE_REDUCE_MEMORY[r["target"]] if bits == 6.0 else None})
        out["schemes"][f"{bits:g}-bit"] = {"targets": rows, "lines": lines}
        print(f"## {bits:g}-bit weights")
        print("\n".join(lines))
    agree = [r["agrees_with_apple"] for r in out["schemes"]["6-bit"]["targets"]]
    out["agreement_6bit"] = f"{sum(agree)}/{len(agree)}"
    print(f"agreement with Apple's reduceMemory choices (6-bit): {out['agreement_6bit']}")
    path = ROOT / "bench/results/lowering_memory_fit_sd-v1.5.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
