"""timm vision encoders from local weights: DINO and MAE ViTs (``vit_base_patch16_224.dino``,
``vit_base_patch16_224.mae``), or any timm model name.

``timm.create_model(arch, pretrained=False, num_classes=0, **arch_kwargs)`` on the meta device,
then the checkpoint's tensors (timm's layout, which the DINO / MAE releases share for ViTs;
a {"model": ...} wrapper as MAE ships is unwrapped; classifier ``head.*`` tensors are dropped,
since an encoder has no head). The grid is timm's ``forward_features`` without its prefix
(CLS / register) tokens: (B, N, D); otherwise the pooled ``pre_logits`` feature (B, D).
"""

from __future__ import annotations

import torch
from torch import nn

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig
from dodo.models.sources.libs import import_timm
from dodo.models.sources.load import build_and_load, freeze_eval, pick_dtype, read_checkpoint


class TimmEncoder(nn.Module):
    """images (B, 3, H, W) -> (B, N, D) patch tokens (grid) or (B, D) pooled features."""

    def __init__(self, net: nn.Module, grid: bool):
        super().__init__()
        self.net = net
        self.grid = grid
        self.hidden = net.num_features

    def train(self, mode: bool = True) -> "nn.Module":
        # A frozen tower stays in eval mode when the model around it trains: BatchNorm keeps its
        # statistics, dropout stays off. One with trainable weights (MAGMA's low-lr encoder) trains.
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.forward_features(images.to(next(self.net.parameters()).dtype))  # (B, P + N, D)
        if self.grid:
            return x[:, getattr(self.net, "num_prefix_tokens", 1):]
        return self.net.forward_head(x, pre_logits=True)


def timm_model(cfg: SourceConfig, key: str = "source") -> nn.Module:
    timm = import_timm()
    try:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=0, **cfg.kwargs())
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"{key}.arch={cfg.arch!r}: {str(err).splitlines()[0]}") from None


def load_timm(cfg: SourceConfig, key: str = "source", device: torch.device | None = None) -> nn.Module:
    if cfg.tower != "vision":
        raise ConfigError(f"{key}.tower={cfg.tower}: timm sources are vision encoders; set tower: vision")
    timm = import_timm()
    if not timm.is_model(cfg.arch.split(".", 1)[0]) or (
            "." in cfg.arch and cfg.arch not in timm.list_pretrained(cfg.arch)):
        raise ConfigError(f"{key}.arch={cfg.arch!r} is not a model timm knows (with its tag, e.g. "
                          "vit_base_patch16_224.dino / .mae)")
    sd = {k: v for k, v in read_checkpoint(cfg.path, key).items() if not k.startswith("head.")}
    net = build_and_load(lambda: timm_model(cfg, key), sd, pick_dtype(cfg.dtype, device), key, cfg.path)
    return freeze_eval(TimmEncoder(net, cfg.grid))
