"""Memory fit per target (snapopt/devices/memory.py): weights at their stored bits, activation peaks that follow
the attention form, the verdict against the per-app limit, the CLI flag and the export's section."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from snapopt.lowering.interfaces import Shapes


@pytest.fixture(scope="module")
def graphs(tiny_pipe):
    from snapopt.devices.memory import pipeline_graphs_for

    return pipeline_graphs_for(tiny_pipe, Shapes(resolution=tiny_pipe.resolution, batch=2))


def _target(ref="iphone-14-pro", **device):
    from snapopt.devices.registry import TARGETS

    t = TARGETS.resolve(ref)
    if device:
        chip = t.device.chip.model_copy(update={k: v for k, v in device.items() if k == "ram_gb"})
        dev = t.device.model_copy(update={"chip": chip, **{k: v for k, v in device.items() if k != "ram_gb"}})
        t = t.model_copy(update={"device": dev})
    return t


def _attention(t, form):
    return t.model_copy(update={"profile": t.profile.model_copy(update={"attention": form})})


def test_weights_are_held_at_their_bits_on_ios17_and_fp16_before(tiny_pipe, graphs):
    from snapopt.devices.memory import component_memory, component_params

    params = component_params(tiny_pipe)["unet"]
    assert params == sum(p.numel() for p in tiny_pipe.unet.parameters())
    t17, t16 = _target(), _target(ios="16.0")
    assert component_memory(graphs["unet"], t17, 16, params=params).weights_mb == pytest.approx(params * 2 / 1e6)
    assert component_memory(graphs["unet"], t17, 4, params=params).weights_mb == pytest.approx(params * 0.5 / 1e6)
    assert component_memory(graphs["unet"], t16, 4, params=params).weights_mb == pytest.approx(params * 2 / 1e6)


def test_attention_form_sets_the_activation_peak(graphs):
    from snapopt.devices.memory import activation_peak

    orig, _ = activation_peak(graphs["unet"], "original")
    split, _ = activation_peak(graphs["unet"], "split_einsum")
    assert split < orig  # one head's scores at a time instead of all heads' at once


def test_verdict_follows_the_limit_resident_then_just_in_time(tiny_pipe, graphs):
    from snapopt.devices.memory import APP_BASE_MB, component_params, pipeline_fit

    params = component_params(tiny_pipe)
    roomy = pipeline_fit(graphs, _target(), 16, params=params)
    assert roomy["fits_resident"] and roomy["verdict"] == "fits with all models resident"
    comps = roomy["components"]
    assert roomy["resident_mb"] == pytest.approx(APP_BASE_MB + sum(c["weights_mb"] for c in comps.values())
                                                 + max(c["activations_mb"] for c in comps.values()), abs=0.1)
    assert roomy["just_in_time_mb"] <= roomy["resident_mb"]
    # a phone whose limit lies between the just-in-time and the resident footprint: reduceMemory is needed
    mid_mb = (roomy["resident_mb"] + roomy["just_in_time_mb"]) / 2
    tight = pipeline_fit(graphs, _target(ram_gb=mid_mb / 1e3 / 0.5), 16, params=params)
    assert not tight["fits_resident"] and tight["fits_just_in_time"]
    assert tight["verdict"] == "fits only loading models just in time (reduceMemory)"
    tiny = pipeline_fit(graphs, _target(ram_gb=0.01), 16, params=params)
    assert tiny["verdict"] == "does not fit"


def test_latency_memory_flag_prints_the_fit_per_target():
    from snapopt.cli import build_cli

    r = CliRunner().invoke(build_cli(), ["latency", "arch:tiny", "--memory", "-t", "iphone-12-mini", "-t", "iphone-15-pro", "--json"],
                           env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    rows = {t["target"]: t for t in out["targets"]}
    assert rows["iphone-12-mini"]["ram_gb"] == 4 and rows["iphone-15-pro"]["ram_gb"] == 8
    assert rows["iphone-12-mini"]["app_limit_mb"] < rows["iphone-15-pro"]["app_limit_mb"]
    assert set(rows["iphone-12-mini"]["components"]) == {"text_encoder", "unet", "vae_decoder"}
