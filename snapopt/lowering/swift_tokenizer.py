"""Apple's Swift ``BPETokenizer`` in Python, and making shipped tokenizer files agree with the model's tokenizer.

Swift (``swift/StableDiffusion/tokenizer/BPETokenizer.swift``) trims and lowercases the prompt, splits it on
spaces only, runs BPE per word (last character marked ``</w>``), looks tokens up in ``vocab.json`` (unknown →
``<|endoftext|>``), pads with ``<|endoftext|>`` and truncates to 77 by dropping the tail. CLIP's tokenizer first
splits words from punctuation and digits, so ``"circle,"`` is ``circle</w> ,</w>`` for the model but one
word for Swift. :func:`patch_for_swift` extends ``merges.txt``/``vocab.json`` so Swift's rule reproduces the
model's ids on given prompts where that is possible without changing any other prompt; what cannot be
patched is covered by a prompt rule the app applies (:data:`PROMPT_RULE`), and both are verified here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import regex

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP's pre-tokenization pattern (transformers' CLIPTokenizer, lowercased input).
CLIP_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                             regex.IGNORECASE)
PROMPT_RULE = ("lowercase, then put a space between CLIP's pre-tokens (letter runs, single digits, punctuation runs, "
               "'s 't 're 've 'm 'll 'd) before calling the pipeline")
GENERIC_PROBES = [
    "a photo of an astronaut riding a horse on mars",
    "a red circle, a blue square and a green triangle in a row",
    "A cat, sitting on a mat!",
    "portrait of a woman, 35mm film, highly detailed",
    "it's a small house by the lake; sunset.",
]


class SwiftBPE:
    """``BPETokenizer.tokenize(input:minCount:)`` as the Swift source does it (ASCII prompts: Swift iterates
    grapheme clusters, CLIP bytes; they agree on ASCII)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.unknown = vocab.get(EOS, 0)

    @classmethod
    def from_folder(cls, folder: Path) -> "SwiftBPE":
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        return cls(vocab, read_merges(folder / "merges.txt"))

    def word(self, word: str) -> list[str]:
        tokens = list(word)
        tokens[-1] += "</w>"
        while len(tokens) > 1:
            pairs = {(a, b) for a, b in zip(tokens, tokens[1:]) if (a, b) in self.ranks}
            if not pairs:
                break
            best = min(pairs, key=self.ranks.__getitem__)
            out, i = [], 0
            while i < len(tokens):
                if i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == best:
                    out.append(tokens[i] + tokens[i + 1])
                    i += 2
                else:
                    out.append(tokens[i])
                    i += 1
            tokens = out
        return tokens

    def tokens(self, text: str) -> list[str]:
        words = [w for w in text.strip().lower().split(" ") if w]
        return [BOS] + [t for w in words for t in self.word(w)] + [EOS]

    def ids(self, text: str, length: int = 77) -> list[int]:
        toks = self.tokens(text)
        toks += [EOS] * max(0, length - len(toks))
        return [self.vocab.get(t, self.unknown) for t in toks[:length]]


def read_merges(path: Path) -> list[tuple[str, str]]:
    """Merges in rank order, parsed as Swift does (``#`` lines skipped; any other line must be two tokens)."""
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        parts = [p for p in line.split(" ") if p]
        if len(parts) != 2:
            raise ValueError(f"{path.name} line {n}: expected two tokens, got {line!r} (Swift throws invalidMergeFileLine)")
        merges.append((parts[0], parts[1]))
    return merges


def apply_prompt_rule(text: str) -> str:
    return " ".join(CLIP_PATTERN.findall(text.strip().lower()))


def reference_ids(tokenizer, text: str, length: int = 77) -> list[int]:
    """The model's own token ids (what it was trained on), padded with ``<|endoftext|>`` like Swift."""
    return list(tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids)


def _trim(ids: list[int], eos: int) -> list[int]:
    """Ids up to and including the first EOS: padding differs only in the pad id, which both make EOS."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def patch_for_swift(vocab: dict[str, int], merges: list[tuple[str, str]], prompts: list[str],
                    reference: Callable[[str], list[int]]) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """Extend ``merges`` (lowest priority, appended) and ``vocab`` (aliases: a non-final piece such as ``circle``
    maps to the id of ``circle</w>``) so Swift's whitespace split reproduces ``reference`` on ``prompts``.

    A word is patched only when its Swift tokens line up with CLIP's pieces and each new alias is free;
    the result is kept only if no prompt that agreed before disagrees after. Returns (vocab, merges, added)."""
    eos = vocab.get(EOS, 0)
    before = SwiftBPE(vocab, merges)
    agreed = {p for p in prompts if _trim(before.ids(p), eos) == _trim(reference(p), eos)}
    new_vocab, new_merges = dict(vocab), list(merges)
    inv: dict[int, set[str]] = {}
    for tok, i in vocab.items():
        inv.setdefault(i, set()).add(tok)
    for prompt in prompts:
        if prompt in agreed:
            continue
        for word in [w for w in prompt.strip().lower().split(" ") if w]:
            pieces = CLIP_PATTERN.findall(word)
            if len(pieces) < 2:
                continue
            want = [p + "</w>" for p in pieces]
            if any(w not in vocab for w in want):
                continue
            targets = [p for p in pieces[:-1]] + [want[-1]]
            if any(t in new_vocab and new_vocab[t] != vocab[w] for t, w in zip(targets[:-1], want[:-1])):
                continue  # the non-final form is a real token with its own id: an alias would break other text
            bpe = SwiftBPE(new_vocab, new_merges)
            toks = bpe.word(word)
            # Group Swift's tokens by piece; give up if one token spans a piece boundary.
            groups, pos, ok = [[] for _ in pieces], 0, True
            bounds = []
            for p in pieces:
                bounds.append((pos, pos + len(p)))
                pos += len(p)
            pos = 0
            for t in toks:
                n = len(t[:-4] if t.endswith("</w>") else t)
                k = next((j for j, (a, b) in enumerate(bounds) if a <= pos and pos + n <= b), None)
                if k is None:
                    ok = False
                    break
                groups[k].append(t)
                pos += n
            if not ok:
                continue
            for group in groups:
                acc = group[0]
                for nxt in group[1:]:
                    if (acc, nxt) not in new_merges:
                        new_merges.append((acc, nxt))
                    acc = acc + nxt
            for t, w in zip(targets[:-1], want[:-1]):
                new_vocab[t] = vocab[w]
    after = SwiftBPE(new_vocab, new_merges)
    if any(_trim(after.ids(p), eos) != _trim(reference(p), eos) for p in agreed):
        return dict(vocab), list(merges), 0
    return new_vocab, new_merges, len(new_merges) - len(merges)


def tokenizer_report(folder: Path, probes: list[str], reference: Callable[[str], list[int]]) -> dict[str, Any]:
    """How Swift tokenizes ``probes`` with the files in ``folder``: raw and under :data:`PROMPT_RULE`.

    The probes and the model's ids go into the export's metadata, so ``snapopt check apple`` can re-verify."""
    bpe = SwiftBPE.from_folder(folder)
    eos = bpe.vocab.get(EOS, 0)
    entries, raw_bad, rule_bad = [], [], []
    for text in probes:
        ref = _trim(reference(text), eos)
        entries.append({"text": text, "ids": ref})
        if _trim(bpe.ids(text), eos) != ref:
            raw_bad.append(text)
        if _trim(bpe.ids(apply_prompt_rule(text)), eos) != ref:
            rule_bad.append(text)
    return {"probes": len(probes), "mismatches_raw": len(raw_bad), "mismatches_with_rule": len(rule_bad),
            "swift_agrees_raw": not raw_bad, "prompt_rule": "none" if not raw_bad else PROMPT_RULE,
            "first_mismatch_raw": raw_bad[0] if raw_bad else None,
            "first_mismatch_with_rule": rule_bad[0] if rule_bad else None, "expected": entries}


def write_swift_tokenizer(tokenizer, folder: Path, probes: list[str]) -> dict[str, Any]:
    """Write ``vocab.json``/``merges.txt`` for Swift, patched where that makes ``probes`` agree; report."""
    from snapopt.models.tokenizer import bpe_files

    vocab_text, merges_text = bpe_files(tokenizer)
    vocab = json.loads(vocab_text)
    merges = [tuple(line.split(" ")) for line in merges_text.split("\n") if line and not line.startswith("#")]
    ref = lambda text: reference_ids(tokenizer, text)  # noqa: E731
    vocab, merges, added = patch_for_swift(vocab, merges, probes, ref)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    report = tokenizer_report(folder, probes, ref)
    report.update(patched=added > 0, merges_added=added, vocab_size=len(set(vocab.values())))
    return report


def probe_prompts(pipe) -> list[str]:
    """Prompts to check tokenization on: for zoo:snapshapes its distinct training and held-out captions (the only
    language it knows), else a fixed set with punctuation, digits and contractions."""
    if str(pipe.source).startswith("zoo:snapshapes"):
        from snapopt.zoo import shapes

        captions = shapes.sample_scenes(2048, seed=0, split="train").captions()
        captions += shapes.heldout_prompts(64).captions()
        return list(dict.fromkeys(captions))
    return list(GENERIC_PROBES)
