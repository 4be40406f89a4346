#!/bin/bash
# Install the wheels carried in .whl/ (no index: the device machine reaches nothing) and snapopt itself, editable.
# Installed packages stay while the machine is warm, so the wheels can come in several calls (64 MiB per call).
set -e
shopt -s nullglob
whl=(.whl/*.whl)
[ ${#whl[@]} -gt 0 ] && python -m pip install -q --no-deps --no-index "${whl[@]}" 2>&1 | grep -v "root user" || true
python -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "root user" || true
python - <<'PY'
import importlib.util as u
need = ["diffusers", "pydantic", "coremltools", "cattrs", "onnx", "onnxscript", "onnxruntime", "onnxsim", "snapopt"]
missing = [m for m in need if u.find_spec(m) is None]
print("missing:", " ".join(missing) if missing else "nothing")
PY
