"""channel_prune on SD-v1.5 (structure only): parameters, MACs at 64x64 latent and pass time per ratio.

    python bench/channel_prune_sd15.py            # prints a markdown table
"""

from __future__ import annotations

import time

from snapopt.capture import block_graph
from snapopt.core import PassContext
from snapopt.lowering.interfaces import Shapes
from snapopt.models import load_model
from snapopt.passes.channel_prune import ChannelPrune


def main() -> None:
    pipe = load_model("arch:sd-v1.5", structure_only=True, components=["unet", "vae"])
    rows = []
    for component, shapes in (("unet", Shapes(512, 2)), ("vae_decoder", Shapes(512, 1))):
        base = block_graph(pipe, component, shapes).totals()
        for ratio in (0.25, 0.5):
            start = time.perf_counter()
            res = ChannelPrune({"component": component, "ratio": ratio}).run(pipe.clone([component]), PassContext())
            seconds = time.perf_counter() - start
            after = block_graph(res.program, component, shapes).totals()
            rows.append((component, ratio, res.stats["achieved_ratio"], base["params"], after["params"],
                         base["macs"] / 1e9, after["macs"] / 1e9, seconds))
    print("| component | requested | achieved (channels) | params before | params after | GMACs before | GMACs after | pass s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c, r, a, pb, pa, mb, ma, s in rows:
        print(f"| {c} | {r} | {a} | {pb:,} | {pa:,} | {mb:.2f} | {ma:.2f} | {s:.1f} |")


if __name__ == "__main__":
    main()
