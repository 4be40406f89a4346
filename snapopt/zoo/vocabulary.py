"""A small CLIP BPE vocabulary (vocab.json + merges.txt) built from the snapshapes caption words.

The files have exactly the format of OpenAI CLIP's tokenizer, so `CLIPTokenizer` (and Apple's Swift
pipeline, which reads the same two files) load them unchanged. Every caption word gets one whole-word
token through a left-to-right chain of merges; all single characters are in the vocabulary too, so any
lowercase ASCII text still tokenizes (into pieces) and decodes back.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from . import shapes

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # SD-v1.5's text length: the ANE/Core ML interface expects (1, 77) ids


def caption_words() -> list[str]:
    """Every word the caption templates can produce, in a fixed order."""
    fixed = ["a", "at", "the", "left", "of", "on", "background", "and", "in", "row", ","]
    words = fixed + list(shapes.SIZES) + list(shapes.COLOURS) + list(shapes.BACKGROUNDS)
    words += list(shapes.SHAPES) + list(shapes.POSITIONS)
    return list(dict.fromkeys(words))


def _learn_merges(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Plain BPE training on the word list until every word is one token.

    Real BPE (not hand-made merge chains) is needed: the tokenizer replays merges by rank, and only
    merges learned jointly over all words replay to the same whole-word segmentation.
    """
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges, new_tokens = [], []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs.values():
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return new_tokens, merges
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, ties alphabetical
        merges.append(best)
        new_tokens.append(best[0] + best[1])
        for w, seg in segs.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = tuple(out)


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (token -> id, merges in rank order)."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = chars + [c + "</w>" for c in chars]
    learned, merges = _learn_merges(caption_words())
    tokens += learned + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt and the configs that `CLIPTokenizer.from_pretrained` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


class CaptionIds:
    """Fast word-level ids for generated captions, identical to CLIPTokenizer's output on them.

    Training builds thousands of captions per second; a dictionary lookup avoids the tokenizer's
    per-string overhead on the device, which has no diffusers install. A test checks equality.
    """

    def __init__(self) -> None:
        self.vocab, _ = build_vocab()
        self.bos, self.eos = self.vocab[BOS], self.vocab[EOS]
        self.size = len(self.vocab)

    def encode(self, caption: str, max_length: int = MAX_LENGTH) -> list[int]:
        words = caption.replace(",", " ,").split()
        ids = [self.bos] + [self.vocab[w + "</w>"] for w in words] + [self.eos]
        ids = ids[:max_length]
        return ids + [self.eos] * (max_length - len(ids))

    def batch(self, captions: list[str], max_length: int = MAX_LENGTH):
        import torch

        return torch.tensor([self.encode(c, max_length) for c in captions], dtype=torch.long)
