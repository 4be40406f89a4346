"""Assemble trained checkpoints into the shipped diffusers folder (fp16 safetensors).

``python -m snapopt.zoo.export --workdir .zoo_work`` writes ``snapopt/zoo/weights/snapshapes/`` (a
folder `StableDiffusionPipeline.from_pretrained` loads) and ``snapshapes-evalclip/`` (the evaluator).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import architectures
from .checkpoints import load_sharded
from .contrastive import EvalClip, EvalClipConfig
from .vocabulary import CaptionIds, write_tokenizer_files

WEIGHTS = Path(__file__).parent / "weights"


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export_pipeline(workdir: Path, out: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    text = architectures.build_text_encoder()
    text.load_state_dict(_strip(load_sharded(workdir / "clip"), "text_encoder."))
    vae_meta = json.loads((workdir / "vae" / "trainer.json").read_text())
    vae = architectures.build_vae(vae_meta["scaling_factor"])
    vae.load_state_dict(load_sharded(workdir / "vae"))
    unet = architectures.build_unet()
    unet.load_state_dict({k: v for k, v in load_sharded(workdir / "unet").items() if not k.startswith("ema.")})
    tok_dir = out / "tokenizer"
    write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    sched = DDIMScheduler.from_config({k: v for k, v in architectures.SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text.half(), tokenizer=tokenizer, unet=unet.half(), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Weights are stored in fp16 to stay small, but transformers 5 would otherwise load the text encoder
    # in its stored dtype while diffusers loads UNet/VAE in fp32; declare fp32 so a plain
    # from_pretrained() gives one consistent CPU-friendly dtype (pass torch_dtype for fp16).
    cfg_path = out / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_evalclip(workdir: Path, out: Path) -> None:
    model = EvalClip(EvalClipConfig(vocab_size=CaptionIds().size))
    model.load_state_dict(load_sharded(workdir / "evalclip"))
    model.save(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(".zoo_work"))
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    export_pipeline(a.workdir, a.out / "snapshapes")
    export_evalclip(a.workdir, a.out / "snapshapes-evalclip")
    total = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"wrote {a.out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
