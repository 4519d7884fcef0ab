"""open_clip towers from a local checkpoint: OpenAI's TorchScript .pt, torch.save .bin/.pt, .safetensors.

The architecture is open_clip's named config (``RN50x16``, ``ViT-B-16``, ``ViT-L-14``...),
optionally overridden by ``arch_kwargs`` (nested: ``{"vision_cfg": {"width": 8}}``), built by
open_clip's own ``CLIP`` class, so the numerics are open_clip's. dodo adds only:

  * ``OpenClipGrid``: the vision tower's token grid. For a modified ResNet (RN50x16) the attention
    pool is removed, as MAGMA does: stem + layer1..4 -> (B, C, h, w) -> (B, h*w, C); at 384 px
    RN50x16 gives 12 x 12 = 144 tokens of 3072. For a ViT: the patch tokens after ln_post (no CLS).
  * ``OpenClipText``: the text tower (encode_text), with open_clip's tokenizer (its bundled BPE).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, open_clip_archs
from dodo.models.sources.libs import import_open_clip
from dodo.models.sources.load import (build_and_load, check_shapes, freeze_eval, is_torchscript,
                                      pick_dtype, read_checkpoint)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: SourceConfig, key: str = "source") -> dict[str, Any]:
    oc = import_open_clip()
    base = oc.get_model_config(cfg.arch)
    if base is None:
        raise ConfigError(f"{key}.arch={cfg.arch!r} is not an architecture open_clip knows "
                          f"(it knows {len(open_clip_archs())}, e.g. RN50x16, ViT-B-16, ViT-L-14)")
    mc = _merge(base, cfg.kwargs())
    if cfg.quick_gelu is not None:
        mc["quick_gelu"] = cfg.quick_gelu
    elif cfg.path and is_torchscript(cfg.path):
        mc["quick_gelu"] = True  # every OpenAI release uses QuickGELU (open_clip's "-quickgelu" names)
    return mc


def _make_clip(mc: dict[str, Any]) -> nn.Module:
    oc = import_open_clip()
    mc = dict(mc)
    for k in ("custom_text", "hf_model_name"):  # the OpenAI layout: plain CLIP
        mc.pop(k, None)
    return oc.model.CLIP(**mc)


class OpenClipGrid(nn.Module):
    """images (B, 3, H, W) -> tokens (B, N, C): RN without attention pool, or ViT patch tokens."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.is_resnet = hasattr(visual, "layer4")
        if self.is_resnet:
            visual.attnpool = nn.Identity()  # MAGMA removes it; its weights are not loaded
            self.hidden = visual.layer4[-1].conv3.out_channels  # 32 * width (RN50x16: 3072)
        else:
            self.hidden = visual.ln_post.normalized_shape[0]  # transformer width (ViT-B/16: 768)

    def train(self, mode: bool = True) -> "nn.Module":
        # A frozen tower stays in eval mode when the model around it trains: BatchNorm keeps its
        # statistics, dropout stays off. One with trainable weights (MAGMA's low-lr encoder) trains.
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = images.to(next(v.parameters()).dtype)
        if self.is_resnet:
            x = v.stem(x)
            x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
            return x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        v.output_tokens = True  # open_clip's own switch: forward returns (pooled, patch tokens)
        return v(x)[1]  # (B, N, width): after ln_post, CLS dropped


class OpenClipText(nn.Module):
    """token ids (B, 77) -> text embeddings (B, embed_dim), open_clip's encode_text."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids)


def load_open_clip(cfg: SourceConfig, key: str = "source", device: torch.device | None = None) -> nn.Module:
    """The configured tower, frozen, in eval mode and the chosen dtype (see SourceConfig.tower)."""
    mc = model_config(cfg, key)
    dtype = pick_dtype(cfg.dtype, device)
    sd = read_checkpoint(cfg.path, key)
    if cfg.tower == "vision":
        # Only the vision tower is built and loaded: the text tower never takes memory.
        def make_visual() -> nn.Module:
            return _make_clip(mc).visual
        prefix = "visual."
        vsd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        with torch.device("meta"):
            check_shapes(_make_clip(mc), sd, key, cfg.path)  # the whole checkpoint against the arch
        if cfg.grid and "attnpool.c_proj.weight" in vsd:
            vsd = {k: v for k, v in vsd.items() if not k.startswith("attnpool.")}

            def make_visual() -> nn.Module:  # noqa: F811 - the grid variant has no attention pool
                visual = _make_clip(mc).visual
                visual.attnpool = nn.Identity()
                return visual
        visual = build_and_load(make_visual, vsd, dtype, key, cfg.path)
        tower: nn.Module = OpenClipGrid(visual) if cfg.grid else visual
    elif cfg.tower in ("full", "text"):
        clip = build_and_load(lambda: _make_clip(mc), sd, dtype, key, cfg.path)
        tower = clip if cfg.tower == "full" else OpenClipText(clip)
    else:
        raise ConfigError(f"{key}.tower={cfg.tower} is not an open_clip tower; use vision, text or full")
    return freeze_eval(tower)


def open_clip_tokenizer(arch: str) -> Any:
    """open_clip's tokenizer for the architecture: str | list[str] -> (B, context_length) int64.
    The BPE vocabulary ships inside the open_clip package; nothing is downloaded."""
    return import_open_clip().get_tokenizer(arch)
