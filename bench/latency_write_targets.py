"""Write the built-in iPhone targets (targets/*.yaml) from public specs and the shared fit.

Every iPhone in the published data gets a target, each with Apple's deployments as profiles. Coefficients are
not per phone: every profile is priced from the shared fit (snapopt/devices/data/latency_fit.json) and its
era; ``calibration.fitted_on`` lists the published rows measured on the same chip with the same attention
form and weight bits — empty means the target is *uncalibrated* (priced from spec and shared coefficients).

  python bench/latency_write_targets.py        # after bench/latency_crossval.py --write-fit
"""

from __future__ import annotations

from pathlib import Path

import yaml

from snapopt.devices.fit import read_published

ROOT = Path(__file__).resolve().parents[1]

#: public specs. ane_tops: Apple's stated peak (int8 from A17 Pro on); bandwidth from the LPDDR generation and
#: a 64-bit bus; GPU/CPU fp16 peaks and system-cache sizes are public estimates (die analyses, reviews).
CHIPS = {
    "A14": dict(name="A14", ane_tops=11.0, ane_tops_precision="fp16", gpu_tflops_fp16=1.6, cpu_gflops_fp16=200.0,
                memory_bandwidth_gbs=34.1, memory_type="LPDDR4X", system_cache_mb=16.0),
    "A15-4gpu": dict(name="A15", ane_tops=15.8, ane_tops_precision="fp16", gpu_tflops_fp16=2.1, cpu_gflops_fp16=230.0,
                     memory_bandwidth_gbs=34.1, memory_type="LPDDR4X", system_cache_mb=32.0),
    "A15": dict(name="A15", ane_tops=15.8, ane_tops_precision="fp16", gpu_tflops_fp16=2.6, cpu_gflops_fp16=230.0,
                memory_bandwidth_gbs=34.1, memory_type="LPDDR4X", system_cache_mb=32.0),
    "A16": dict(name="A16", ane_tops=17.0, ane_tops_precision="fp16", gpu_tflops_fp16=3.6, cpu_gflops_fp16=260.0,
                memory_bandwidth_gbs=51.2, memory_type="LPDDR5", system_cache_mb=24.0),
    "A17 Pro": dict(name="A17 Pro", ane_tops=35.0, ane_tops_precision="int8", gpu_tflops_fp16=4.3, cpu_gflops_fp16=290.0,
                    memory_bandwidth_gbs=51.2, memory_type="LPDDR5", system_cache_mb=24.0),
    "A18 Pro": dict(name="A18 Pro", ane_tops=35.0, ane_tops_precision="int8", gpu_tflops_fp16=4.8, cpu_gflops_fp16=320.0,
                    memory_bandwidth_gbs=59.9, memory_type="LPDDR5X", system_cache_mb=24.0),
}
PHONES = [  # id, name, chip key, RAM GB, iOS the deployment assumes
    ("iphone-12-mini", "iPhone 12 mini", "A14", 4, "17.0"),
    ("iphone-12-pro", "iPhone 12 Pro", "A14", 6, "17.0"),
    ("iphone-12-pro-max", "iPhone 12 Pro Max", "A14", 6, "17.0"),
    ("iphone-13", "iPhone 13", "A15-4gpu", 4, "17.0"),
    ("iphone-13-pro-max", "iPhone 13 Pro Max", "A15", 6, "17.0"),
    ("iphone-14", "iPhone 14", "A15", 6, "17.0"),
    ("iphone-14-pro", "iPhone 14 Pro", "A16", 6, "17.0"),
    ("iphone-14-pro-max", "iPhone 14 Pro Max", "A16", 6, "17.0"),
    ("iphone-15-pro", "iPhone 15 Pro", "A17 Pro", 8, "17.0"),
    ("iphone-15-pro-max", "iPhone 15 Pro Max", "A17 Pro", 8, "17.0"),
    ("iphone-16-pro-max", "iPhone 16 Pro Max", "A18 Pro", 8, "18.0"),
]
PROFILES = [  # the first is the default
    dict(name="snapfusion-fp16", attention="split_einsum", weight_bits=16, compute_units="CPU_AND_NE", era="snapfusion"),
    dict(name="apple-split-einsum-v2-6bit", attention="split_einsum_v2", weight_bits=6, compute_units="CPU_AND_NE", era="2023-08"),
    dict(name="apple-split-einsum-mixed-4bit", attention="split_einsum", weight_bits=4, compute_units="CPU_AND_NE", era="2023-08"),
    dict(name="apple-split-einsum-fp16", attention="split_einsum", weight_bits=16, compute_units="CPU_AND_NE", era="2023-08"),
]
HEADER = """{name}: Apple-stated Neural Engine peak; bandwidth from the memory generation; GPU/CPU peaks and cache size are public estimates.
Written by bench/latency_write_targets.py. Coefficients are shared by every chip (snapopt/devices/data/latency_fit.json);
a profile's fitted_on lists the published rows on this chip with its attention form and weight bits (empty: uncalibrated).
Profiles: snapfusion-fp16 (SnapFusion's fp16 deployment, its harness), apple-split-einsum-v2-6bit, apple-split-einsum-mixed-4bit
and apple-split-einsum-fp16 (Apple ml-stable-diffusion, August 2023 runtime); select one as {id}@<profile>."""


def fitted_on(rows, chip: str, prof: dict) -> list[str]:
    return [f"{r.label} = {r.latency_ms:g} ms ({r.source})" for r in rows
            if r.chip == chip and r.attention == prof["attention"] and r.weight_bits == prof["weight_bits"]]


def main() -> None:
    rows, _ = read_published()
    for tid, name, chip_key, ram, ios in PHONES:
        chip = dict(CHIPS[chip_key], ram_gb=float(ram))
        profiles = [(dict(p), fitted_on(rows, chip["name"], p)) for p in PROFILES]
        data = {"id": tid, "device": {"name": name, "chip": chip, "ios": ios, "max_weights_per_model_mb": 1024.0},
                "profile": dict(profiles[0][0], activation_bits=16),
                "calibration": {"coefficients": {}, "fitted_on": profiles[0][1]},
                "other_profiles": [{"profile": dict(p, activation_bits=16), "calibration": {"coefficients": {}, "fitted_on": f}}
                                   for p, f in profiles[1:]]}
        text = "".join(f"# {ln}\n" for ln in HEADER.format(name=name, id=tid).splitlines()) + yaml.safe_dump(data, sort_keys=False)
        (ROOT / "targets" / f"{tid}.yaml").write_text(text)
        print(f"targets/{tid}.yaml: " + ", ".join(f"{p['name']} {'calibrated' if f else 'uncalibrated'}" for p, f in profiles))


if __name__ == "__main__":
    main()
