"""ONNX exports in a worker process alongside Core ML: the same files and report as the serial path, progress and
timings per stage, and a worker failure re-raised here naming the component."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

from snapopt.lowering.interfaces import Shapes


@pytest.fixture(scope="module")
def micro(tiny_pipe):
    """arch:tiny with a micro UNet (fast to convert)."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_pipe.clone()
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                     cross_attention_dim=pipe.text_encoder.config.hidden_size, attention_head_dim=2,
                                     norm_num_groups=4).eval()
    return pipe


def _lower(pipe, folder, parallel):
    from snapopt.lowering.export import lower_exports
    from snapopt.recipe import validate_recipe

    resolved = validate_recipe({"name": "t", "model": "arch:tiny", "targets": ["iphone-14-pro"],
                                "export": {"components": ["unet", "text_encoder"], "memory_fit": False}})
    said, timings = [], {}

    @contextlib.contextmanager
    def stage(name):
        said.append(name)
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0

    result = lower_exports(pipe, resolved, Shapes(resolution=pipe.resolution, batch=2), folder, stage, parallel=parallel)
    return result, said, timings


def test_worker_writes_the_serial_exports_with_per_stage_progress(micro, tmp_path):
    serial, said_s, _ = _lower(micro, tmp_path / "serial" / "exports", parallel=False)
    par, said_p, timings = _lower(micro, tmp_path / "par" / "exports", parallel=True)
    onnx_stages = [f"export {c} to ONNX" for c in ("unet", "text_encoder")]
    assert [s for s in said_p if s in onnx_stages] == onnx_stages
    assert all(timings[s] > 0 for s in onnx_stages) and "wait for the ONNX export worker" in timings
    assert "parallel" in par and "parallel" not in serial
    assert [e["file"] for e in par["onnx"]] == [e["file"] for e in serial["onnx"]]
    for a, b in zip(serial["onnx"], par["onnx"]):
        assert a["onnxruntime_relative_error"] < 1e-4 and b["onnxruntime_relative_error"] == a["onnxruntime_relative_error"]
        assert (tmp_path / "serial" / a["file"]).read_bytes() == (tmp_path / "par" / b["file"]).read_bytes()
    assert [e["bytes"] for e in par["coreml"]] == [e["bytes"] for e in serial["coreml"]]


def test_worker_failure_names_the_component(tmp_path):
    from snapopt.errors import LoweringError
    from snapopt.lowering.interfaces import ComponentIO
    from snapopt.lowering.parallel import OnnxWorker

    broken = ComponentIO("vae_decoder", torch.nn.Linear(4, 4), (torch.randn(2, 3),), ["z"], ["image"])  # wrong width
    worker = OnnxWorker([("export vae_decoder to ONNX", "vae_decoder", None, broken)], tmp_path,
                        check=True, stage=lambda name: contextlib.nullcontext()).start()
    with pytest.raises(LoweringError, match="ONNX export of 'vae_decoder' failed"):
        worker.join()


def test_two_cores_stay_serial(monkeypatch):
    from snapopt.lowering.parallel import use_worker

    assert not use_worker(2) and use_worker(16)
    assert use_worker(16, weight_bytes=1 << 30, ram=64 << 30) and not use_worker(16, weight_bytes=16 << 30, ram=64 << 30)
    monkeypatch.setenv("SNAPOPT_EXPORT_WORKER", "1")
    assert use_worker()
    monkeypatch.setenv("SNAPOPT_EXPORT_WORKER", "0")
    assert not use_worker()
