"""The zoo trainer runs and resumes on CPU (a few steps, tiny batch)."""

import json

from snapopt.zoo.checkpoints import load_sharded
from snapopt.zoo.train import main


def test_clip_stage_trains_and_resumes(tmp_path):
    args = ["--stage", "clip", "--workdir", str(tmp_path), "--batch", "4", "--device", "cpu", "--minutes", "1"]
    main(args + ["--steps", "2"])
    state = json.loads((tmp_path / "clip" / "trainer.json").read_text())
    assert state["step"] == 2 and state["history"]
    main(args + ["--steps", "3"])
    state = json.loads((tmp_path / "clip" / "trainer.json").read_text())
    assert state["step"] == 3 and len(state["runs"]) == 2
    assert any(k.startswith("text_encoder.") for k in load_sharded(tmp_path / "clip"))
    assert (tmp_path / "clip" / "optimizer.safetensors").exists()
