"""Fuzz: corrupted model folders, unreachable hub ids, unwritable outputs and leftovers of killed runs, through
``snapopt apply`` in process. Every bad input exits 2 with one line naming the file (or folder) and writes
nothing, found before any model loads (``snapopt.run.apply`` and ``load_model`` are tripwires).
``python -m pytest -q tests/test_fuzz_models.py -s`` prints the tally.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from snapopt import zoo

RECIPE = {"name": "fuzz", "model": "arch:tiny", "passes": [{"pass": "attention_sdpa"}], "export": {"coreml": False, "onnx": False}}


@pytest.fixture(scope="session")
def tiny_saved(tmp_path_factory):
    """arch:tiny written once by snapopt's own save code (a snapopt run's model folder)."""
    from snapopt.models import load_model
    from snapopt.serialization import save

    folder = tmp_path_factory.mktemp("tiny") / "model"
    save(load_model("arch:tiny", seed=0), folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    """Hard-linked copy: cheap; corruptions below replace files (unlink + write), never edit them in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _edit_json(rel: str, fn):
    def corrupt(folder: Path) -> Path:
        p = folder / rel
        data = json.loads(p.read_text())
        fn(data)
        _replace(p, json.dumps(data).encode())
        return p
    return corrupt


def _bytes(rel: str, fn):
    def corrupt(folder: Path) -> Path:
        p = folder / rel
        _replace(p, fn(p.read_bytes()))
        return p
    return corrupt


def _tensors(rel: str, fn):
    def corrupt(folder: Path) -> Path:
        from safetensors.torch import load_file, save_file

        p = folder / rel
        sd = load_file(str(p))
        fn(sd)
        p.unlink()
        save_file(sd, str(p))
        return p
    return corrupt


def _delete(rel: str, name_in_message: str | None = None):
    def corrupt(folder: Path) -> Path:
        p = folder / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        return folder / name_in_message if name_in_message else p
    return corrupt


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _first_key(sd) -> str:
    return sorted(sd)[0]


UNET_W = "unet/diffusion_pytorch_model.safetensors"
VAE_W = "vae/diffusion_pytorch_model.safetensors"
TE_W = "text_encoder/model.safetensors"

#: (id, corruption(folder) -> the path the one-line error must name, or a fragment via "fragment:...")
CORRUPTIONS = [
    ("unet-in_channels-str", _edit_json("unet/config.json", _set("in_channels", "four"))),
    ("unet-in_channels-float", _edit_json("unet/config.json", _set("in_channels", 4.5))),
    ("unet-in_channels-zero", _edit_json("unet/config.json", _set("in_channels", 0))),
    ("unet-in_channels-huge", _edit_json("unet/config.json", _set("in_channels", 10**12))),
    ("unet-block_out-strs", _edit_json("unet/config.json", _set("block_out_channels", ["a", "b"]))),
    ("unet-block_out-short", _edit_json("unet/config.json", _set("block_out_channels", [32]))),
    ("unet-down_types-int", _edit_json("unet/config.json", _set("down_block_types", 5))),
    ("unet-down_types-unknown", _edit_json("unet/config.json", _set("down_block_types", ["NoSuchBlock2D"] * 4))),
    ("unet-layers-neg", _edit_json("unet/config.json", _set("layers_per_block", -1))),
    ("unet-sample_size-str", _edit_json("unet/config.json", _set("sample_size", "big"))),
    ("unet-cross_dim-list-str", _edit_json("unet/config.json", _set("cross_attention_dim", "wide"))),
    ("unet-center-str", _edit_json("unet/config.json", _set("center_input_sample", "no"))),
    ("unet-config-invalid-json", _bytes("unet/config.json", lambda b: b[: len(b) // 2])),
    ("unet-config-empty", _bytes("unet/config.json", lambda b: b"")),
    ("unet-config-list", _bytes("unet/config.json", lambda b: b"[1, 2]")),
    ("unet-config-utf16", _bytes("unet/config.json", lambda b: b.decode().encode("utf-16"))),
    ("unet-config-binary", _bytes("unet/config.json", lambda b: bytes(range(256)))),
    ("unet-config-missing", _delete("unet/config.json")),
    ("unet-folder-missing", _delete("unet")),
    ("vae-latent-str", _edit_json("vae/config.json", _set("latent_channels", "four"))),
    ("vae-norm-groups-zero", _edit_json("vae/config.json", _set("norm_num_groups", 0))),
    ("vae-config-invalid", _bytes("vae/config.json", lambda b: b"{" + b)),
    ("te-hidden-str", _edit_json("text_encoder/config.json", _set("hidden_size", "big"))),
    ("te-layers-zero", _edit_json("text_encoder/config.json", _set("num_hidden_layers", 0))),
    ("te-config-invalid", _bytes("text_encoder/config.json", lambda b: b.replace(b"{", b"", 1))),
    ("unet-weights-truncated-half", _bytes(UNET_W, lambda b: b[: len(b) // 2])),
    ("unet-weights-truncated-tail", _bytes(UNET_W, lambda b: b[:-1])),
    ("unet-weights-4-bytes", _bytes(UNET_W, lambda b: b[:4])),
    ("unet-weights-empty", _bytes(UNET_W, lambda b: b"")),
    ("unet-weights-random", _bytes(UNET_W, lambda b: os.urandom(4096))),
    ("unet-weights-header-len-huge", _bytes(UNET_W, lambda b: (2**60).to_bytes(8, "little") + b[8:])),
    ("unet-weights-header-garbage", _bytes(UNET_W, lambda b: b[:8] + b"\xff" * 64 + b[72:])),
    ("te-weights-truncated", _bytes(TE_W, lambda b: b[: len(b) * 3 // 4])),
    ("vae-weights-truncated", _bytes(VAE_W, lambda b: b[: len(b) - 100])),
    ("unet-missing-tensor", _tensors(UNET_W, lambda sd: sd.pop(_first_key(sd)))),
    ("unet-wrong-shape", _tensors(UNET_W, lambda sd: sd.__setitem__("conv_in.bias", sd["conv_in.bias"][:-1].clone()))),
    ("te-missing-tensor", _tensors(TE_W, lambda sd: sd.pop(sorted(k for k in sd if "layers.0" in k)[0]))),
    ("vae-all-nan", _tensors(VAE_W, lambda sd: [t.fill_(float("nan")) for t in sd.values() if t.is_floating_point()])),
    ("unet-all-nan", _tensors(UNET_W, lambda sd: [t.fill_(float("nan")) for t in sd.values() if t.is_floating_point()])),
    ("unet-one-inf", _tensors(UNET_W, lambda sd: sd["conv_out.weight"].view(-1).__setitem__(3, float("inf")))),
    ("te-one-nan", _tensors(TE_W, lambda sd: sd[_first_key(sd)].view(-1).__setitem__(0, float("nan")))),
    ("unet-only-pickle", lambda f: (_delete(UNET_W)(f), (f / "unet/diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01."), f / "unet")[-1]),
    ("tokenizer-missing", _delete("tokenizer", "tokenizer")),
    ("tokenizer-vocab-missing", lambda f: (_delete("tokenizer/vocab.json")(f), _delete("tokenizer/tokenizer.json")(f), f / "tokenizer")[-1]),
    ("tokenizer-vocab-invalid", _bytes("tokenizer/vocab.json", lambda b: b[:10])),
    ("tokenizer-merges-binary", _bytes("tokenizer/merges.txt", lambda b: b"\x00\xff" * 10)),
    ("model-index-invalid", _bytes("model_index.json", lambda b: b[:-3])),
    ("model-index-list", _bytes("model_index.json", lambda b: b"[]")),
    ("model-index-bad-entry", _edit_json("model_index.json", _set("unet", ["diffusers"]))),
    ("model-index-no-unet", _edit_json("model_index.json", lambda d: d.pop("unet"))),
    ("model-index-missing", _delete("model_index.json", "")),
    ("scheduler-invalid", _bytes("scheduler/scheduler_config.json", lambda b: b"{'a': 1}")),
    ("scheduler-missing", _delete("scheduler/scheduler_config.json")),
]

#: the same kinds of damage to a snapopt run's model folder (snapopt.json beside the diffusers layout)
SNAPOPT_CORRUPTIONS = [
    ("snapopt-manifest-invalid", _bytes("snapopt.json", lambda b: b[: len(b) // 3])),
    ("snapopt-manifest-list", _bytes("snapopt.json", lambda b: b"[]")),
    ("snapopt-unet-config-type", _edit_json("unet/config.json", _set("in_channels", "four"))),
    ("snapopt-unet-truncated", _bytes(UNET_W, lambda b: b[: len(b) // 2])),
    ("snapopt-vae-all-nan", _tensors(VAE_W, lambda sd: [t.fill_(float("nan")) for t in sd.values() if t.is_floating_point()])),
    ("snapopt-tokenizer-missing", _delete("tokenizer", "tokenizer")),
    ("snapopt-te-truncated", _bytes(TE_W, lambda b: b[:100])),
]


@pytest.fixture(scope="module", autouse=True)
def _libraries_imported():
    """Import diffusers/transformers (and whatever optional backends they probe) outside the captured
    stderr: what those print on import depends on the machine, not on the input under test."""
    from snapopt.checks.model import check_model_reference

    check_model_reference("zoo:snapshapes")


def _apply(args, capsys) -> tuple[int, list[str]]:
    from snapopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["apply", *map(str, args)])
    return exc.value.code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def _recipe(folder: Path) -> Path:
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(RECIPE))
    return p


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fuzz(base: Path, corruptions, tmp_path: Path, capsys) -> tuple[int, list[str]]:
    recipe = _recipe(tmp_path)
    failures = []
    for i, (case_id, corrupt) in enumerate(corruptions):
        model = _copy(base, tmp_path / f"m{i}")
        named = corrupt(model)
        before = _listing(tmp_path)
        out = tmp_path / f"run{i}"
        t0 = time.perf_counter()
        code, err = _apply([recipe, "--model", model, "--out", out], capsys)
        want = str(named).rstrip("/")
        ok = (code == 2 and len(err) == 1 and err[0].startswith("error: ") and want in err[0]
              and _listing(tmp_path) == before and not out.exists())
        if not ok:
            failures.append(f"{case_id}: exit {code}, want {want!r}, got {err[:3]} ({time.perf_counter() - t0:.1f}s)")
        shutil.rmtree(model)
    return len(corruptions), failures


def test_fuzz_corrupted_diffusers_folders(tmp_path, capsys, tripwire):
    n, failures = _fuzz(Path(zoo.zoo_path("snapshapes")), CORRUPTIONS, tmp_path, capsys)
    print(f"\nfuzz corrupted diffusers folders: {n} cases, {n - len(failures)} clean ({100 * (n - len(failures)) / n:.1f}%)")
    assert not failures, "\n".join(failures)


def test_fuzz_corrupted_snapopt_folders(tiny_saved, tmp_path, capsys, tripwire):
    n, failures = _fuzz(tiny_saved, SNAPOPT_CORRUPTIONS, tmp_path, capsys)
    print(f"\nfuzz corrupted snapopt folders: {n} cases, {n - len(failures)} clean ({100 * (n - len(failures)) / n:.1f}%)")
    assert not failures, "\n".join(failures)


def test_intact_folders_pass_the_checks(tiny_saved):
    from snapopt.checks.model import check_model_reference

    assert check_model_reference("zoo:snapshapes") == Path(zoo.zoo_path("snapshapes"))
    assert check_model_reference(str(tiny_saved)) == tiny_saved


def test_unreachable_hub_id_fails_in_seconds(tmp_path, capsys, tripwire, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    recipe = _recipe(tmp_path)
    t0 = time.perf_counter()
    code, err = _apply([recipe, "--model", "someorg/some-model", "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err) == 1 and "someorg/some-model" in err[0] and "unreachable" in err[0]
    assert time.perf_counter() - t0 < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _apply([recipe, "--model", "someorg/some-model", "--out", tmp_path / "run"], capsys)
    assert code == 2 and len(err) == 1 and "HF_HUB_OFFLINE" in err[0]
    assert not (tmp_path / "run").exists()


def test_unwritable_outputs_fail_before_work(tmp_path, capsys, tripwire, monkeypatch):
    recipe = _recipe(tmp_path)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "exists").mkdir()
    unwritable = next((d for d in ("/sys/kernel", "/sys", "/proc") if os.path.isdir(d)), None)
    cases = [
        (tmp_path / "a-file" / "run", "is a file"),
        (tmp_path / "a-file", "is a file"),
        (tmp_path / "exists", "already exists"),
        (tmp_path / ("n" * 300), "too long"),
    ]
    if unwritable:
        cases.append((Path(unwritable) / "snapopt-run", "cannot be written"))
    failures = []
    for out, fragment in cases:
        before = _listing(tmp_path)
        code, err = _apply([recipe, "--out", out], capsys)
        if not (code == 2 and len(err) == 1 and fragment in err[0] and _listing(tmp_path) == before):
            failures.append(f"{out}: exit {code}, got {err}")
    # a full disk is found before the run, from the estimated output size
    import snapopt.checks.output as output

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, err = _apply([recipe, "--out", tmp_path / "full"], capsys)
    if not (code == 2 and len(err) == 1 and "free" in err[0] and not (tmp_path / "full").exists()):
        failures.append(f"disk full: exit {code}, got {err}")
    assert not failures, "\n".join(failures)


def _leftovers(parent: Path) -> list[Path]:
    dirs = [parent / ".run.tmp-k1ll3d", parent / ".run.old-1700000000", parent / ".other.tmp-abc"]
    for d in dirs:
        (d / "model").mkdir(parents=True)
        (d / "model" / "weights.safetensors").write_bytes(b"0" * 1000)
    return dirs


def test_stale_run_folders_are_removed_before_the_next_run(tmp_path, capsys, monkeypatch):
    import snapopt.run

    parent = tmp_path / "runs"
    leftovers = _leftovers(parent)
    keep = parent / "finished-run"
    keep.mkdir()
    seen = {}

    def fake_apply(resolved, out, **kw):
        seen["left"] = [d for d in leftovers if d.exists()]
        raise KeyboardInterrupt

    monkeypatch.setattr(snapopt.run, "apply", fake_apply)
    code, err = _apply([_recipe(tmp_path), "--out", parent / "run"], capsys)
    assert code == 130 and err == ["interrupted (Ctrl-C)"]
    assert seen["left"] == [] and keep.is_dir()


def test_leftovers_of_a_run_still_working_are_kept(tmp_path, capsys, monkeypatch):
    """Another run holds the parent's lock: its temporary folder is not ours to delete."""
    import snapopt.run

    parent = tmp_path / "runs"
    leftovers = _leftovers(parent)
    monkeypatch.setattr(snapopt.run, "apply", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        code, _ = _apply([_recipe(tmp_path), "--out", parent / "run"], capsys)
    finally:
        os.close(fd)
    assert code == 130 and all(d.exists() for d in leftovers)
