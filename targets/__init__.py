"""snapopt's built-in iPhone targets, one YAML file each (written by bench/latency_write_targets.py).

Registered through the ``snapopt.targets`` entry-point group exactly as a third-party target package would:
each entry point names one of the paths below.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

iphone_12_mini = _HERE / "iphone-12-mini.yaml"
iphone_12_pro = _HERE / "iphone-12-pro.yaml"
iphone_12_pro_max = _HERE / "iphone-12-pro-max.yaml"
iphone_13 = _HERE / "iphone-13.yaml"
iphone_13_pro_max = _HERE / "iphone-13-pro-max.yaml"
iphone_14 = _HERE / "iphone-14.yaml"
iphone_14_pro = _HERE / "iphone-14-pro.yaml"
iphone_14_pro_max = _HERE / "iphone-14-pro-max.yaml"
iphone_15_pro = _HERE / "iphone-15-pro.yaml"
iphone_15_pro_max = _HERE / "iphone-15-pro-max.yaml"
iphone_16_pro_max = _HERE / "iphone-16-pro-max.yaml"
