"""A character-level CLIP tokenizer built on the fly, for architecture presets that ship no vocabulary.

Real pipelines bring their own BPE ``vocab.json``/``merges.txt``; random-weight presets still need a valid
tokenizer so that Core ML resources are complete and ``input_ids`` are meaningful token ids.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: 256 printable code points standing for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def char_vocab() -> dict[str, int]:
    """Vocabulary of every byte symbol, alone and word-final, plus CLIP's two special tokens (514 ids)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_char_tokenizer_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(char_vocab(), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


@lru_cache(maxsize=1)
def char_tokenizer():
    from transformers import CLIPTokenizer

    folder = write_char_tokenizer_files(Path(tempfile.mkdtemp(prefix="snapopt-tok-")))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def bpe_files(tokenizer) -> tuple[str, str]:
    """``(vocab.json text, merges.txt text)`` of a CLIP BPE tokenizer, whichever backend it uses.

    Apple's Swift tokenizer (and older transformers) read these two files; transformers 5 saves only
    ``tokenizer.json``, so they are rebuilt from its BPE model."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())["model"]
        vocab, merges = model["vocab"], model.get("merges", [])
    else:  # slow tokenizer
        vocab = tokenizer.encoder
        merges = [" ".join(pair) for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(line + "\n" for line in lines)


def write_bpe_files(tokenizer, folder: Path) -> list[str]:
    vocab, merges = bpe_files(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab)
    (folder / "merges.txt").write_text(merges)
    return ["vocab.json", "merges.txt"]
