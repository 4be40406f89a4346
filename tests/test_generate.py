"""`snapopt generate MODEL "prompt"`: one PNG from any model reference (the command the CLI registers)."""

from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from snapopt.errors import UsageError
from snapopt.generate import generate, generate_command


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("generate")(generate_command)
    app.command("noop")(lambda: None)  # two commands, so typer keeps the command name as the CLI has it
    return app


def test_generate_writes_a_png(tmp_path: Path):
    out = tmp_path / "img" / "circle.png"
    res = CliRunner().invoke(_app(), ["generate", "arch:tiny", "a red circle", "--steps", "2", "--cfg", "3", "--seed", "1",
                                      "--out", str(out)])
    assert res.exit_code == 0, res.output
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    again = tmp_path / "again.png"
    generate("arch:tiny", "a red circle", steps=2, cfg=3, seed=1, out=again)
    assert Image.open(again).tobytes() == image.tobytes()  # seeded: the same image twice


@pytest.mark.parametrize("kw, field", [({"steps": 0}, "--steps"), ({"cfg": 0.5}, "--cfg"), ({"out": Path("x.jpg")}, "--out"),
                                           ({"scheduler": "pndm"}, "--scheduler")])
def test_bad_arguments_name_the_option(kw, field):
    with pytest.raises(UsageError, match=field):
        generate("arch:tiny", "a red circle", **kw)
