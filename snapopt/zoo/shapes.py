"""Procedural "snapshapes" text-to-image data: one to three flat shapes on a plain background.

Scenes are sampled as small integer tensors and rendered with vectorised torch ops, so a GPU trainer
gets a fresh batch of 128x128 images in well under a millisecond and never waits on a data loader.
Everything is deterministic given a seed. A fixed fraction of whole scene combinations (objects,
their order/position and background) is held out of training, so evaluation prompts describe
attribute combinations the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_SIZE = 128
COLUMNS = 3  # objects sit in one of three vertical strips: left, center, right

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray")
POSITIONS = ("left", "center", "right")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

RADIUS = {"small": 8.0, "large": 14.0}
MAX_OBJECTS = 3
HELD_OUT_EVERY = 10  # one scene combination in ten is never used for training


@dataclass(frozen=True)
class Scene:
    """One scene; ``columns[i]`` is the strip (0 left, 1 center, 2 right) of object ``i``."""

    sizes: tuple[int, ...]
    colours: tuple[int, ...]
    shapes: tuple[int, ...]
    columns: tuple[int, ...]
    background: int

    @property
    def caption(self) -> str:
        objs = [f"a {SIZES[s]} {COLOURS[c]} {SHAPES[k]}" for s, c, k in zip(self.sizes, self.colours, self.shapes)]
        bg = f"on a {BACKGROUNDS[self.background]} background"
        if len(objs) == 1:
            return f"{objs[0]} at the {POSITIONS[self.columns[0]]} {bg}"
        if len(objs) == 2:
            return f"{objs[0]} left of {objs[1]} {bg}"
        return f"{objs[0]}, {objs[1]} and {objs[2]} in a row {bg}"


@dataclass
class SceneBatch:
    """Scene attributes as tensors of shape (B, MAX_OBJECTS); ``active`` marks real objects."""

    count: torch.Tensor  # (B,) 1..3
    sizes: torch.Tensor
    colours: torch.Tensor
    shapes: torch.Tensor
    columns: torch.Tensor
    active: torch.Tensor  # bool
    background: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def scene(self, i: int) -> Scene:
        n = int(self.count[i])
        pick = lambda t: tuple(int(v) for v in t[i, :n])  # noqa: E731
        return Scene(pick(self.sizes), pick(self.colours), pick(self.shapes), pick(self.columns), int(self.background[i]))

    def scenes(self) -> list[Scene]:
        return [self.scene(i) for i in range(len(self))]

    def captions(self) -> list[str]:
        return [s.caption for s in self.scenes()]

    def to(self, device) -> "SceneBatch":
        return SceneBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @staticmethod
    def from_scenes(scenes: list[Scene]) -> "SceneBatch":
        b = len(scenes)
        out = {k: torch.zeros(b, MAX_OBJECTS, dtype=torch.long) for k in ("sizes", "colours", "shapes", "columns")}
        active = torch.zeros(b, MAX_OBJECTS, dtype=torch.bool)
        for i, s in enumerate(scenes):
            n = len(s.shapes)
            for k in out:
                out[k][i, :n] = torch.tensor(getattr(s, k))
            active[i, :n] = True
        count = active.sum(1)
        bg = torch.tensor([s.background for s in scenes], dtype=torch.long)
        return SceneBatch(count=count, active=active, background=bg, **out)


def _combination_key(batch: SceneBatch) -> torch.Tensor:
    """Integer id of a scene's attribute combination (ignores jitter)."""
    obj = batch.sizes * (len(COLOURS) * len(SHAPES)) + batch.colours * len(SHAPES) + batch.shapes + 1
    obj = torch.where(batch.active, obj, torch.zeros_like(obj))
    key = batch.count
    for j in range(MAX_OBJECTS):
        key = key * 64 + obj[:, j]
    single_col = torch.where(batch.count == 1, batch.columns[:, 0], torch.zeros_like(batch.count))
    return (key * 4 + single_col) * 4 + batch.background


def is_held_out(batch: SceneBatch) -> torch.Tensor:
    """True for scenes whose combination is reserved for evaluation (a fixed hash of the key)."""
    h = (_combination_key(batch) * 2654435761 + 97) % 2147483647
    h = (h * 40503 + 12345) % 2147483647
    return (h % HELD_OUT_EVERY) == 0


def _sample_raw(n: int, gen: torch.Generator) -> SceneBatch:
    count = torch.randint(1, MAX_OBJECTS + 1, (n,), generator=gen)
    idx = torch.arange(MAX_OBJECTS).expand(n, MAX_OBJECTS)
    active = idx < count[:, None]
    sizes = torch.randint(0, len(SIZES), (n, MAX_OBJECTS), generator=gen)
    shapes = torch.randint(0, len(SHAPES), (n, MAX_OBJECTS), generator=gen)
    # distinct colours per scene: first three entries of a random permutation
    colours = torch.argsort(torch.rand(n, len(COLOURS), generator=gen), dim=1)[:, :MAX_OBJECTS]
    single = torch.randint(0, COLUMNS, (n,), generator=gen)
    columns = torch.stack([single, torch.ones_like(single), torch.full_like(single, 2)], 1)
    columns = torch.where((count == 2)[:, None], torch.tensor([0, 2, 2]).expand(n, 3), columns)
    columns = torch.where((count == 3)[:, None], torch.tensor([0, 1, 2]).expand(n, 3), columns)
    background = torch.randint(0, len(BACKGROUNDS), (n,), generator=gen)
    return SceneBatch(count, sizes, colours, shapes, columns, active, background)


def sample_scenes(n: int, seed: int, split: str = "train") -> SceneBatch:
    """Draw ``n`` scenes from the ``train`` or ``heldout`` combinations, deterministically by seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    gen = torch.Generator().manual_seed(seed)
    want_held = split == "heldout"
    parts, have = [], 0
    while have < n:
        raw = _sample_raw(max(4 * (n - have), 64) * (HELD_OUT_EVERY if want_held else 1), gen)
        keep = is_held_out(raw) == want_held
        sel = SceneBatch(**{k: v[keep] for k, v in raw.__dict__.items()})
        parts.append(sel)
        have += len(sel)
    merged = {k: torch.cat([getattr(p, k) for p in parts])[:n] for k in raw.__dict__}
    return SceneBatch(**merged)


def heldout_prompts(n: int, seed: int = 1234) -> SceneBatch:
    """The evaluation scenes: ``n`` distinct held-out combinations (fixed for a given seed)."""
    batch = sample_scenes(8 * n + 64, seed, split="heldout")
    seen, keep = set(), []
    for i, s in enumerate(batch.scenes()):
        if s.caption not in seen:
            seen.add(s.caption)
            keep.append(i)
        if len(keep) == n:
            break
    idx = torch.tensor(keep)
    return SceneBatch(**{k: v[idx] for k, v in batch.__dict__.items()})


def _palette(names) -> torch.Tensor:
    return torch.tensor([COLOUR_RGB[c] for c in names], dtype=torch.float32) / 127.5 - 1.0


def render(batch: SceneBatch, seed: int, device="cpu") -> torch.Tensor:
    """Render scenes to images in [-1, 1], shape (B, 3, 128, 128), with seeded position jitter."""
    b = len(batch)
    batch = batch.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    jx = (torch.rand(b, MAX_OBJECTS, generator=gen) * 6 - 3).to(device)
    jy = (torch.rand(b, MAX_OBJECTS, generator=gen) * 44 - 22).to(device)
    jr = (torch.rand(b, MAX_OBJECTS, generator=gen) - 0.5).to(device)
    strip = IMAGE_SIZE / COLUMNS
    cx = (batch.columns.float() + 0.5) * strip + jx
    cy = IMAGE_SIZE / 2 + jy
    r = torch.where(batch.sizes == 1, RADIUS["large"], RADIUS["small"]) + jr

    coords = torch.arange(IMAGE_SIZE, device=device, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, 1, -1) - cx[..., None, None]  # (B, K, 1, W)
    dy = coords.view(1, 1, -1, 1) - cy[..., None, None]  # (B, K, H, 1)
    rr = r[..., None, None]
    d_circle = torch.sqrt(dx**2 + dy**2) - rr
    d_square = torch.maximum(dx.abs(), dy.abs()) - 0.88 * rr
    h, half_base = 2.3 * rr, 1.15 * rr  # upright isosceles triangle centred on (cx, cy)
    edge = (dx.abs() * h - (dy + h / 2) * half_base) / torch.sqrt(h**2 + half_base**2)
    d_triangle = torch.maximum(dy - h / 2, edge)
    shp = batch.shapes[..., None, None]
    dist = torch.where(shp == 0, d_circle, torch.where(shp == 1, d_square, d_triangle))
    alpha = (0.5 - dist).clamp(0, 1) * batch.active[..., None, None]  # (B, K, H, W)

    bg = _palette(BACKGROUNDS).to(device)[batch.background]  # (B, 3)
    fg = _palette(COLOURS).to(device)[batch.colours]  # (B, K, 3)
    img = bg[:, :, None, None].expand(b, 3, IMAGE_SIZE, IMAGE_SIZE)
    for k in range(MAX_OBJECTS):
        a = alpha[:, k : k + 1]
        img = img * (1 - a) + fg[:, k, :, None, None] * a
    return img.contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (B,3,H,W) -> uint8 (B,H,W,3) for viewing and checking."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
