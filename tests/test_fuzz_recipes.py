"""Fuzz: several hundred malformed recipes through ``snapopt apply``, in process.

Every case must exit 2 with exactly one stderr line that names the problem (field, file or value) and write
nothing — found before any model loads (``snapopt.run.apply`` is replaced by a tripwire). Run alone:
``python -m pytest -q tests/test_fuzz_recipes.py -s`` prints the tally.
"""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import pytest
import yaml

BASE = {"name": "fuzz", "model": "arch:tiny", "passes": [{"pass": "attention_sdpa"}], "targets": ["iphone-14-pro"],
        "export": {"coreml": False, "onnx": False}}


def _yaml(data) -> bytes:
    return yaml.safe_dump(data, sort_keys=False).encode()


def _with(path: str, value):
    """BASE with the dotted ``path`` set to ``value`` (list indices as integers)."""
    import copy

    data = copy.deepcopy(BASE)
    keys = path.split(".")
    cur = data
    for k in keys[:-1]:
        k = int(k) if k.isdigit() else k
        if isinstance(cur, dict) and k not in cur:
            cur[k] = {}
        cur = cur[k]
    last = keys[-1]
    cur[int(last) if last.isdigit() else last] = value
    return data


def _pass(name: str, options: dict) -> dict:
    return {**BASE, "passes": [{"pass": name, "options": options}]}


def file_cases() -> list[tuple[str, bytes, str]]:
    """Broken files (encoding, YAML, size, depth, duplicate keys): (id, bytes, fragment the error line must
    contain; ``{file}`` stands for the file's path). Shared with the ``snapopt train`` spec fuzz."""
    rng = random.Random(13)
    out: list[tuple[str, bytes, str]] = []
    # -- the file itself --------------------------------------------------------------------------------
    for i in range(24):
        out.append((f"random-bytes-{i}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))), "{file}"))
    out += [
        ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40), "{file}"),
        ("gzip", gzip.compress(_yaml(BASE)), "{file}"),
        ("utf16-bom", "name: x\n".encode("utf-16"), "UTF-16"),
        ("utf16-be", b"\xfe\xff" + "name: x\n".encode("utf-16-be"), "UTF-16"),
        ("latin1-byte", "name: caf\xe9\nmodel: arch:tiny\n".encode("latin-1"), "not UTF-8"),
        ("nul-byte", b"name: x\x00\n", "binary"),
        ("empty", b"", "mapping"),
        ("only-comment", b"# nothing\n", "mapping"),
        ("top-list", b"- a\n- b\n", "mapping"),
        ("top-scalar", b"42\n", "mapping"),
        ("top-string", b"hello\n", "mapping"),
        ("huge-file", b"name: x\ndescription: '" + b"a" * (1 << 20) + b"'\n", "bytes"),
        ("deep-flow-20000", b"name: x\nmodel: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nesting"),
        ("deep-flow-unclosed", b"a: " + b"[" * 20000 + b"\n", "nesting"),
        ("deep-flow-map", b"x: " + b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n", "nesting"),
        ("deep-block", "".join(f"{' ' * i}k{i}:\n" for i in range(200)).encode() + b" " * 200 + b"v\n", "nesting"),
        ("billion-laughs", (b"a: &a ['x','x','x','x','x','x','x','x','x']\n"
                            + b"".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n".encode()
                                       for i in range(8))), "expands"),
        ("dup-top", b"name: a\nname: b\nmodel: arch:tiny\n", "duplicate key 'name'"),
        ("dup-model", b"name: a\nmodel: arch:tiny\nmodel: zoo:snapshapes\n", "duplicate key 'model'"),
        ("dup-nested", b"name: a\nmodel: arch:tiny\nexport:\n  coreml: false\n  coreml: true\n", "duplicate key 'coreml'"),
        ("dup-in-pass", b"name: a\nmodel: arch:tiny\npasses:\n  - pass: remove_blocks\n    pass: channel_prune\n", "duplicate key 'pass'"),
        ("dup-flow", b"name: a\nexport: {onnx: false, onnx: true}\n", "duplicate key 'onnx'"),
        ("python-tag", b"name: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
        ("python-name", b"name: !!python/name:os.system\n", "invalid YAML"),
        ("unknown-tag", b"name: !custom x\n", "invalid YAML"),
        ("bad-indent", b"name: x\n  model: y\n", "invalid YAML"),
        ("unclosed-list", b"name: x\npasses: [\n", "invalid YAML"),
        ("unclosed-quote", b"name: 'x\n", "invalid YAML"),
        ("tab-indent", b"name: x\nexport:\n\tcoreml: false\n", "invalid YAML"),
        ("bad-alias", b"name: *nothing\n", "invalid YAML"),
        ("int-key", b"1: 2\nname: x\n", "not a string"),
        ("complex-key", b"? [a, b]\n: 1\nname: x\n", "{file}"),
        ("null-key", b"~: 1\nname: x\n", "not a string"),
        ("bool-key", b"true: 1\nname: x\n", "not a string"),
    ]
    return out


def cases() -> list[tuple[str, bytes, str]]:
    """Every malformed recipe: broken files, then bad fields and bad pass options."""
    rng = random.Random(13)
    out = file_cases()
    # -- top-level fields ------------------------------------------------------------------------------------
    bad_values = {
        "name": ["", "has space", "../escape", "x" * 500, 5, None, [], {}, "-dash", ".dot", "ünïcode"],
        "description": [5, ["a"], {"a": 1}, "d" * 20_000],
        "model": ["", "x" * 5000, "a/" * 3000, "arch:nope", "zoo:nope", "/nonexistent/folder/model", "./missing",
                  "a/b/c", "~nope/x", "no\x01ctrl", 5, None, [], {"a": 1}, "arch:"],
        "resolution": [0, -8, 100, 4, 7, 10**9, 2**64, 8192, "64x", 1.5, [64], {"a": 1}, -(2**63)],
        "batch": [0, -1, 10**6, 65, 2**63, "two", 1.5, 1e30, [], None, float("inf")],
        "seed": [-1, 2**32, 2**64, 10**30, "x", 1.5, [], float("nan"), None],
        "plugins": ["single.py", [5], ["nonexistent.py"], ["no_such_module_xyz:Cls"], ["os:nothing"], [""], ["x" * 5000 + ".py"],
                    ["a b c"], [None], {"a": 1}, ["p.py"] * 40],
        "passes": ["remove_blocks", [5], [None], [{"options": {}}], [{"pass": "no_such_pass"}], [{"pass": ""}],
                   [{"pass": 5}], [{"pass": "remove_blocks", "opts": {}}], [{"pass": "remove_blocks", "options": []}],
                   [{"pass": "nope.py"}], [{"pass": "no_such_module_xyz:Cls"}], [{"pass": "snapopt.cli:app"}],
                   [{"pass": "attention_sdpa"}] * 201, {"pass": "attention_sdpa"}],
        "targets": ["iphone-14-pro", [5], ["iphone-99"], [""], ["nope.yaml"], ["../../etc/passwd.yaml"], [None],
                    ["iphone-14-pro@nope"], ["x" * 5000], ["iphone-14-pro"] * 40, {"a": 1}],
        "export": [5, "coreml", [], None],
        "export.weight_bits": [0, -1, 9, 12, 15, 17, 32, 1000, 2**40, "8x", 4.5, None, []],
        "export.components": ["unet", ["vae"], [5], ["unet", "nope"], {"a": 1}],
        "export.coreml": ["maybe", 5, [], None],
        "export.colour": [True],
        "verify.tolerance": [float("inf"), float("nan"), -float("inf"), 0, -1e-4, 2.0, 1e30, "small", [], None],
        "verify.enabled": ["maybe", 5, [], None],
        "verify": [5, "on", []],
        "output.dtype": ["int8", "bfloat16", 5, None],
        "output.save_model": ["maybe", []],
        "output": [5, "x"],
        "unknown_key": [1],
        "modle": ["arch:tiny"],
    }
    for path, values in bad_values.items():
        field = path.split(".")[-1] if path not in ("unknown_key", "modle") else path
        for j, v in enumerate(values):
            out.append((f"{path}[{j}]", _yaml(_with(path, v)), field))
    # -- seeded random out-of-range and mistyped values ------------------------------------------------------
    word = lambda: "".join(rng.choice("abcxyz-_ ") for _ in range(rng.randrange(1, 12)))  # noqa: E731
    gens = {
        "batch": lambda: rng.choice([rng.randint(-10**9, 0), rng.randint(65, 10**12), word(), [rng.randint(1, 4)]]),
        "resolution": lambda: rng.choice([rng.randrange(1, 4096, 8) + rng.randint(1, 7), rng.randint(4097, 10**9) * 8, -8 * rng.randint(1, 99), word()]),
        "seed": lambda: rng.choice([-rng.randint(1, 10**9), rng.randint(2**32, 2**70), word()]),
        "export.weight_bits": lambda: rng.choice([rng.randint(9, 15), rng.randint(17, 10**6), -rng.randint(0, 99), word()]),
        "verify.tolerance": lambda: rng.choice([rng.uniform(1.01, 1e300), -rng.uniform(0, 1e3), 0.0, word()]),
        "name": lambda: rng.choice([" " + word(), word() + "/" + word(), "x" * rng.randint(101, 999), rng.randint(0, 9)]),
    }
    for j in range(60):
        path = rng.choice(sorted(gens))
        out.append((f"random-{path}-{j}", _yaml(_with(path, gens[path]())), path.split(".")[-1]))
    # -- pass options (built-in passes) ------------------------------------------------------------------
    bad_options = {
        "remove_blocks": [{}, {"blocks": []}, {"blocks": "mid_block"}, {"blocks": [5]}, {"blocks": ["x" * 1000]},
                          {"blocks": ["mid_block", "mid_block"]}, {"blocks": [""]}, {"blocks": ["stage:1"], "component": "vae_decoder"},
                          {"blocks": ["mid_block"], "component": "vae"}, {"blocks": ["mid_block"], "component": 5},
                          {"blocks": ["mid_block"], "keep_skips": "perhaps"}, {"blocks": ["mid_block"], "colour": "red"},
                          {"blocks": ["mid_block"] * 3000}],
        "channel_prune": [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": float("nan")}, {"ratio": float("inf")}, {"ratio": "half"},
                          {"round_to": 0}, {"round_to": 1e30}, {"round_to": 10**6}, {"round_to": -4}, {"calibration_batches": 0},
                          {"calibration_batches": 1e30}, {"criterion": "taylor", "calibration_batches": 10**9},
                          {"criterion": "l3"}, {"heads": "some"}, {"component": "text_encoder"}, {"component": "vae"},
                          {"per_module": {"down_blocks.0": 2.0}}, {"per_module": {"down_blocks.0": float("nan")}},
                          {"per_module": ["down_blocks.0"]}, {"with_encoder": "perhaps"}, {"keep": 5}, {"nope": 1}],
        "attention_sdpa": [{"component": "text_encoder"}, {"component": "vae"}, {"component": 5}, {"extra": 1}],
        "attention_split_einsum": [{"component": "vae_encoder"}, {"x": 1}],
        "attention_original": [{"component": None}],
        "remove_self_attention": [{"component": "vae_decoder"}, {"resolutions": [-1]}, {"resolutions": [0]},
                                  {"resolutions": [10**9]}, {"resolutions": "64"}, {"blocks": [5]}, {"blocks": ["x" * 1000]},
                                  {"resolutions": list(range(1, 40))}],
        "grouped_query_attention": [{"kv_heads": 0}, {"kv_heads": -2}, {"kv_heads": 10**9}, {"which": "neither"},
                                    {"kv_heads": "one"}],
        "fuse_qkv": [{"component": "text_encoder"}, {"fused": True}],
        "linear_to_conv": [{"component": "vae_decoder"}],
        "separable_conv": [{"resolutions": [-8]}, {"resolutions": [10**12]}, {"convs": ["conv3"]}, {"convs": "conv1"},
                           {"component": "text_encoder"}, {"blocks": [None]}],
        "block_prune": [{"prompts": 0}, {"prompts": 10**6}, {"budget_fraction": 0}, {"budget_fraction": 1.5},
                        {"budget_ms": -1}, {"timesteps": []}, {"evaluator": "fid"}, {"kinds": ["mlp"]}, {"reevaluate_every": -1},
                        {"component": "vae_decoder"}, {"timesteps": [5000]}, {"timesteps": [-1]}],
    }
    for name, opts in bad_options.items():
        for j, o in enumerate(opts):
            key = next(iter(o), None)
            out.append((f"{name}.options[{j}]", _yaml(_pass(name, o)), "passes[0].options" + (f".{key}" if key and len(o) == 1 else "")))
    return out


def _run(recipe: Path, out: Path, capsys, extra=()) -> tuple[int, list[str]]:
    from snapopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["apply", str(recipe), "--out", str(out), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return exc.value.code, err


def test_fuzz_malformed_recipes(tmp_path, capsys, tripwire, monkeypatch):
    monkeypatch.chdir(tmp_path)
    all_cases = cases()
    assert len(all_cases) >= 300
    failures = []
    for i, (case_id, data, fragment) in enumerate(all_cases):
        work = tmp_path / f"c{i}"
        work.mkdir()
        recipe = work / "recipe.yaml"
        recipe.write_bytes(data)
        out = work / "run"
        code, err = _run(recipe, out, capsys)
        want = fragment.replace("{file}", str(recipe))
        ok = (code == 2 and len(err) == 1 and err[0].startswith("error: ") and want in err[0] and "Traceback" not in err[0]
              and sorted(p.name for p in work.iterdir()) == ["recipe.yaml"] and len(err[0]) < 600)
        if not ok:
            failures.append(f"{case_id}: exit {code}, want {want!r}, got {err[:3]}, wrote {sorted(p.name for p in work.iterdir())}")
    clean = len(all_cases) - len(failures)
    print(f"\nfuzz recipes: {len(all_cases)} cases, {clean} clean ({100 * clean / len(all_cases):.1f}%)")
    assert not failures, "\n".join(failures)


def test_recipe_paths_that_are_not_files(tmp_path, capsys, tripwire):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    (tmp_path / "folder.yaml").mkdir()
    for path, fragment in [(fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                           (tmp_path / "folder.yaml", "is a folder"), (tmp_path / "missing.yaml", "not found"),
                           (tmp_path / ("n" * 300 + ".yaml"), "cannot be read")]:
        code, err = _run(path, tmp_path / "run", capsys)
        assert code == 2 and len(err) == 1 and fragment in err[0] and not (tmp_path / "run").exists(), (path, err)


def test_valid_base_recipe_reaches_the_run(tmp_path, capsys, monkeypatch):
    """The fuzz base is itself valid: its cases fail for what was changed, not for the base."""
    import snapopt.run

    seen = {}

    def fake(resolved, out, **kw):
        seen["out"] = out
        raise KeyboardInterrupt  # stop here: interrupted is 130 with one line

    monkeypatch.setattr(snapopt.run, "apply", fake)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(_yaml(BASE))
    code, err = _run(recipe, tmp_path / "run", capsys)
    assert seen["out"] == tmp_path / "run"
    assert code == 130 and err == ["interrupted (Ctrl-C)"]
