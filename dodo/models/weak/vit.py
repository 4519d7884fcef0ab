"""The weak family's vision encoder: a timm ViT (DINO / MAE), run block by block.

The model needs four things timm's ``forward_features`` does not give: MAE's masking (only the
visible patch tokens enter the blocks), token replay between blocks (replay.py), tokens of
another modality in place of the patch embeddings (cross-modal reprogramming) and an attention
mask for those. ``ViTRunner.tokens`` is timm's ``forward_features`` written out with those
hooks; with none of them it is the same computation (tested against timm's own forward).
"""

from __future__ import annotations

import torch
from torch import nn

from dodo.adapters.inject import Block
from dodo.config.errors import ConfigError
from dodo.models.sources import SourceConfig, load_source
from dodo.models.sources.load import freeze_eval


def build_vit(cfg: SourceConfig, key: str = "model.weak.vision") -> nn.Module:
    """The timm VisionTransformer (no classifier head), frozen: from a local checkpoint (kind
    timm, loaded by dodo.models.sources) or random (the arch with timm's init; the caller seeds)."""
    if cfg.kind == "timm":
        net = load_source(cfg, key).net  # TimmEncoder -> its timm model
    else:
        from dodo.models.sources.timmvit import timm_model
        net = timm_model(cfg, key)
    if not hasattr(net, "blocks") or not hasattr(net, "patch_embed"):
        raise ConfigError(f"{key}.arch={cfg.arch!r} is not a ViT (timm VisionTransformer): the weak family "
                          "needs its patch embedding and block list")
    if getattr(net, "no_embed_class", False) or getattr(net, "reg_token", None) is not None \
            or getattr(net, "dynamic_img_size", False):
        raise ConfigError(f"{key}.arch={cfg.arch!r}: ViTs with register tokens, class-free position "
                          "embeddings or dynamic sizes are not supported; use a DINO / MAE ViT")
    return freeze_eval(net.float())


def vit_block_specs(net: nn.Module, prefix: str = "vit.") -> list[Block]:
    """timm blocks ``blocks.i``: attention ``attn`` (out ``attn.proj``), MLP ``mlp`` (``mlp.fc2``)."""
    d, heads = net.embed_dim, net.blocks[0].attn.num_heads
    return [Block(f"{prefix}blocks.{i}", "vision", i, d, heads, "attn", "attn.proj", ["mlp"], ["mlp.fc2"])
            for i in range(len(net.blocks))]


class ViTRunner:
    """Runs a timm ViT with masking, replay and input-token hooks. Holds no parameters."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.prefix = int(getattr(net, "num_prefix_tokens", 1))  # [CLS]
        self.patch = net.patch_embed.patch_size[0]
        self.num_patches = net.patch_embed.num_patches

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) patch embeddings (no position, no [CLS])."""
        return self.net.patch_embed(images)

    def add_positions(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens at patch positions 0..L-1 -> (B, 1 + L, D) with [CLS], positions added
        (timm's _pos_embed for a class-token ViT, for L <= N)."""
        net = self.net
        cls = net.cls_token.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + net.pos_embed[:, : self.prefix + patches.shape[1]]
        return net.norm_pre(net.patch_drop(net.pos_drop(x)))

    def tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None, replay: nn.Module | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + L, D) embedded tokens -> (B, 1 + L', D) final-normed tokens.

        keep (B, K) long: indices of the patch tokens that enter the blocks (MAE), [CLS] always;
        replay: a TokenReplay; attn_mask (B, 1, S, S) bool, True = may attend."""
        if keep is not None:
            patches = x[:, self.prefix:]
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
            x = torch.cat([x[:, : self.prefix], patches], dim=1)  # (B, 1 + K, D)
        for i, blk in enumerate(self.net.blocks):
            if replay is not None:
                x = replay.before(i, x)
            x = blk(x) if attn_mask is None else blk(x, attn_mask=attn_mask)
            if replay is not None:
                replay.after(i, x)
        return self.net.norm(x)

    def features(self, images: torch.Tensor, replay: nn.Module | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, D): timm's forward_features with the hooks."""
        return self.tokens(self.add_positions(self.embed_images(images)), replay=replay)
