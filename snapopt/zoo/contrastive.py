"""Small contrastive image/text models: the image tower used to pretrain the conditioning text encoder,
and the independent evaluation CLIP ("evalclip") that scores generated images.

The evaluation CLIP deliberately differs from the conditioning encoder (own text transformer with mean
pooling, wider image tower, other seed), so a generator cannot score well merely by matching its own
text features.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ImageTower(nn.Module):
    """Strided CNN to a 4x4 map, flattened (keeps left/center/right), projected to an embedding."""

    def __init__(self, width: int = 32, embed: int = 128, feature: int = 256):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans, chans[1:]):  # 128 -> 64 -> 32 -> 16 -> 8 -> 4
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            ]
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, feature), nn.GELU())
        self.proj = nn.Linear(feature, embed)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features, used for FID."""
        return self.feature(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images))


class MeanPoolTextTower(nn.Module):
    """Pre-norm transformer over token ids, mean-pooled over non-padding tokens."""

    def __init__(self, vocab_size: int, width: int = 96, layers: int = 2, heads: int = 4, length: int = 77, embed: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        m = mask[..., None].to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1))


@dataclass
class EvalClipConfig:
    vocab_size: int
    image_width: int = 40
    text_width: int = 96
    text_layers: int = 2
    embed: int = 128
    feature: int = 256


class EvalClip(nn.Module):
    """The evaluation CLIP: embeddings for CLIP score, image features for FID."""

    def __init__(self, config: EvalClipConfig):
        super().__init__()
        self.config = config
        self.image = ImageTower(config.image_width, config.embed, config.feature)
        self.text = MeanPoolTextTower(config.vocab_size, config.text_width, config.text_layers, embed=config.embed)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        # the mask keeps BOS, words and the first EOS; later EOS tokens are padding
        first_eos = (ids == eos_id).int().argmax(1)
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= first_eos[:, None]
        return self.text(ids, mask)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "EvalClip":
        from safetensors.torch import load_file

        model = cls(EvalClipConfig(**json.loads((Path(folder) / "config.json").read_text())))
        state = {k: v.float() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
        model.load_state_dict(state)
        return model.eval()


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; rows with identical captions count as positives for each other."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())
