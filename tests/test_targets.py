"""Targets as plugins, following docs/adding-an-iphone.md step by step: a YAML file outside the repo and an
entry-point-installed target both show up in `snapopt targets` and work in `snapopt latency`; calibration."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from snapopt.cli import build_cli
from snapopt.devices import registry
from snapopt.devices.target import load_target_file
from snapopt.errors import PluginError, TargetError, UsageError

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-an-iphone.md"
BUILTINS = ["iphone-12-mini", "iphone-12-pro", "iphone-12-pro-max", "iphone-13", "iphone-13-pro-max", "iphone-14", "iphone-14-pro",
            "iphone-14-pro-max", "iphone-15-pro", "iphone-15-pro-max", "iphone-16-pro-max"]
#: published rows exist on these chips (A14, A15, A16) in Apple's split_einsum_v2 6-bit deployment
MEASURED = ["iphone-12-mini", "iphone-12-pro", "iphone-12-pro-max", "iphone-13", "iphone-13-pro-max", "iphone-14", "iphone-14-pro",
            "iphone-14-pro-max"]


def _doc_yaml() -> str:
    """The iPhone 17 Pro YAML exactly as the page shows it."""
    return re.search(r"```yaml\n(id: iphone-17-pro.*?)```", DOC.read_text(), re.S).group(1)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "TARGETS", registry.TargetRegistry())
    monkeypatch.delenv(registry.PATH_VARIABLE, raising=False)


def _run(*args):
    result = CliRunner().invoke(build_cli(), list(args), catch_exceptions=True, env={"COLUMNS": "300"})
    return result


def _latency_json(*targets) -> dict:
    args = ["latency", "arch:tiny", "--json"]
    for t in targets:
        args += ["--target", t]
    result = _run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def test_builtins_are_registered_as_entry_points():
    items = {tid: source for tid, _t, source in registry.TARGETS.items()}
    assert set(BUILTINS) <= set(items)
    assert all(items[t].startswith("entry point") for t in BUILTINS)
    for t in BUILTINS:  # every Apple profile selectable on every phone
        assert {"snapfusion-fp16", "apple-split-einsum-v2-6bit", "apple-split-einsum-mixed-4bit",
                "apple-split-einsum-fp16"} <= set(registry.TARGETS.resolve(t).profile_names())
    for t in MEASURED:  # calibrated where published rows exist, flagged uncalibrated elsewhere
        assert registry.TARGETS.resolve(t + "@apple-split-einsum-v2-6bit").calibrated
    assert registry.TARGETS.resolve("iphone-14-pro").calibrated
    for t in ("iphone-15-pro", "iphone-15-pro-max", "iphone-16-pro-max"):
        assert registry.TARGETS.resolve(t).calibrated_profiles == []


def test_yaml_target_outside_the_repo(tmp_path, monkeypatch):
    phones = tmp_path / "phones"
    phones.mkdir()
    path = phones / "iphone-17-pro.yaml"
    cal = yaml.safe_load(Path(registry.__file__).resolve().parents[2].joinpath("targets/iphone-16-pro-max.yaml").read_text())
    text = _doc_yaml().replace("coefficients: {}", "coefficients: " + json.dumps(cal["calibration"]["coefficients"]))
    path.write_text(text)
    # step 2a: by path
    out = _latency_json(str(path), "iphone-16-pro-max")
    assert [t["target"] for t in out["tables"]] == ["iphone-17-pro", "iphone-16-pro-max"]
    # step 2b: discoverable through SNAPOPT_TARGETS_PATH, listed by `snapopt targets`
    monkeypatch.setenv(registry.PATH_VARIABLE, str(phones))
    monkeypatch.setattr(registry, "TARGETS", registry.TargetRegistry())
    listed = _run("targets")
    assert listed.exit_code == 0 and "iphone-17-pro" in listed.output and "file" in listed.output
    out = _latency_json("iphone-17-pro")
    assert out["tables"][0]["total_ms"] > 0 and out["tables"][0]["blocks"]


def test_entry_point_target(tmp_path, monkeypatch):
    """What `pip install ./my-iphones` leaves on sys.path: the package plus a dist-info with entry_points.txt."""
    site = tmp_path / "site"
    pkg = site / "my_iphones"
    pkg.mkdir(parents=True)
    (pkg / "iphone-17-pro.yaml").write_text(_doc_yaml())
    (pkg / "__init__.py").write_text("from pathlib import Path\niphone_17_pro = Path(__file__).parent / 'iphone-17-pro.yaml'\n")
    dist = site / "my_iphones-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-iphones\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[snapopt.targets]\niphone-17-pro = my_iphones:iphone_17_pro\n")
    monkeypatch.syspath_prepend(str(site))
    listed = _run("targets")
    assert listed.exit_code == 0, listed.output
    assert "iphone-17-pro" in listed.output and "my-iphones" in listed.output
    out = _latency_json("iphone-17-pro", "iphone-14-pro")
    assert out["tables"][0]["target"] == "iphone-17-pro" and out["tables"][0]["total_ms"] > 0


def test_entry_point_name_must_match_the_id(tmp_path):
    with pytest.raises(PluginError, match="entry point name 'iphone-18' differs from the target's id 'iphone-17-pro'"):
        registry.TARGETS.register(load_target_file(_write(_doc_yaml(), tmp_path)), "entry point 'iphone-18' (x)", expected_id="iphone-18")


def _write(text: str, folder: Path, name: str = "phone.yaml") -> Path:
    p = folder / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("edit, field", [
    (lambda s: s.replace("ane_tops: 38", "ane_tops: -1"), "device.chip.ane_tops"),
    (lambda s: s.replace("ram_gb: 12", "ram_gb: 12\n    flux_capacitor: 1"), "device.chip.flux_capacitor: unknown key"),
    (lambda s: s.replace("    memory_bandwidth_gbs: 76.8\n", ""), "device.chip.memory_bandwidth_gbs: Field required"),
    (lambda s: s.replace("attention: split_einsum", "attention: magic"), "profile.attention"),
    (lambda s: s.replace("id: iphone-17-pro", "id: iPhone 17"), "id"),
])
def test_bad_yaml_is_one_line_naming_file_and_field(edit, field, tmp_path):
    path = _write(edit(_doc_yaml()), tmp_path, "bad-phone.yaml")
    with pytest.raises(TargetError) as e:
        load_target_file(path)
    msg = str(e.value)
    assert "\n" not in msg and "bad-phone.yaml" in msg and field in msg, msg


def test_doc_error_example_matches(tmp_path):
    path = _write(_doc_yaml().replace("ane_tops: 38", "ane_tops: -1"), tmp_path, "iphone-17-pro.yaml")
    with pytest.raises(TargetError, match=re.escape("device.chip.ane_tops: Input should be greater than 0 (got -1)")):
        load_target_file(path)


def test_profiles_and_bad_references():
    t = registry.TARGETS.resolve("iphone-14-pro@apple-split-einsum-v2-6bit")
    assert t.profile.attention == "split_einsum_v2" and t.profile.weight_bits == 6
    assert t.calibration.fitted_on != registry.TARGETS.resolve("iphone-14-pro").calibration.fitted_on
    with pytest.raises(TargetError, match="has no profile 'nope'"):
        registry.TARGETS.resolve("iphone-14-pro@nope")
    with pytest.raises(TargetError, match="unknown target 'iphone-99'"):
        registry.TARGETS.resolve("iphone-99")


def test_latency_cli_plot_and_bad_component(tmp_path):
    png = tmp_path / "lat.png"
    result = _run("latency", "arch:tiny", "--target", "iphone-14-pro", "--target", "iphone-15-pro", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "total" in result.output and png.read_bytes()[:4] == b"\x89PNG"
    bad = _run("latency", "arch:tiny", "--component", "flux")
    assert isinstance(bad.exception, UsageError) and "--component" in str(bad.exception)


def test_calibrate_writes_a_target_that_reproduces_the_rows(tmp_path):
    base = registry.TARGETS.resolve("iphone-14-pro")
    from snapopt.devices.latency import model_tables

    tables, _ = model_tables("arch:tiny", [base], "unet", batch=2)
    measured = 3 * tables[0].total_ms  # a slower deployment than the built-in calibration
    csv = tmp_path / "mine.csv"
    csv.write_text("device,chip,profile,model,component,resolution,batch,weight_bits,latency_ms,source,notes\n"
                   f"iphone-14-pro,A16,my-deploy,tiny,unet_step,64,2,16,{measured:.4f},bench,\n")
    out = tmp_path / "iphone-14-pro.mine.yaml"
    result = _run("target", "calibrate", "--csv", str(csv), "--target", "iphone-14-pro", "--out", str(out), "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    fit = json.loads(result.output[result.output.index("{"):])
    assert abs(fit["rows"][0]["error_pct"]) < 10
    new = load_target_file(out)
    assert "my-deploy" in new.profile_names()
    tables, _ = model_tables("arch:tiny", [new.with_profile("my-deploy")], "unet", batch=2)
    assert tables[0].total_ms == pytest.approx(measured, rel=0.10)


def test_calibrate_rejects_a_bad_csv(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("device,chip,model\nx,A16,sd\n")
    result = _run("target", "calibrate", "--csv", str(csv), "--target", "iphone-14-pro")
    assert isinstance(result.exception, UsageError)
    assert "missing column 'profile'" in str(result.exception) and "\n" not in str(result.exception)
