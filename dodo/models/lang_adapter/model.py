"""LanguageAdapter: frozen target-language encoder -> trainable adapter -> CLIP's text space.

student(tgt) = up(pool(layers(down(BERT(tgt).last_hidden_state))))   (B, D), D = CLIP projection_dim
teacher(src) = CLIP.get_text_features(src)                          (B, D), frozen, no grad
loss = mse(student, teacher)  or  1 - cos(student, teacher), averaged over the batch

Only ``down``, ``layers`` and ``up`` train; the encoder and CLIP are frozen and kept in eval
mode (their dropout off), so their weights and outputs never change. The adapter's transformer
layers are torch's ``nn.TransformerEncoderLayer`` (pre-norm, GELU), mask-aware.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from dodo.models.clip.model import build_clip
from dodo.models.lang_adapter.config import LangAdapterModelConfig
from dodo.models.registry import InitState


def build(cfg: LangAdapterModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init: InitState | None = None) -> "LanguageAdapter":
    """The family's model builder (FamilySpec.model); vocab / EOS are CLIP's (English) tokenizer's."""
    return LanguageAdapter(cfg, vocab_size, eos_token_id)


def _text_features(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5: an output object


class LanguageAdapter(nn.Module):
    def __init__(self, cfg: LangAdapterModelConfig, vocab_size: int, eos_token_id: int):
        super().__init__()
        a = cfg.lang_adapter
        self.cfg = a
        self.clip = build_clip(cfg, vocab_size, eos_token_id)  # cfg.clip: a local CLIPModel or the tiny one
        # DeepSpeed broadcasts every parameter as bytes and cannot view CLIP's 0-dim temperature: (1,).
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1).clone())
        self.clip.requires_grad_(False)
        self.encoder = AutoModel.from_pretrained(a.encoder_path, local_files_only=True)
        self.encoder.requires_grad_(False)
        width = self.encoder.config.hidden_size
        dim = self.clip.config.projection_dim
        self.down = nn.Linear(width, a.hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(a.hidden, a.heads, a.ffn_mult * a.hidden, a.dropout, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(a.layers))
        self.norm = nn.LayerNorm(a.hidden)  # pre-norm layers leave the residual stream unnormalised
        self.up = nn.Linear(a.hidden, dim)
        self.train()

    def train(self, mode: bool = True) -> "LanguageAdapter":
        super().train(mode)
        self.encoder.eval()  # frozen towers: dropout off in training too
        self.clip.eval()
        return self

    def student(self, tgt_ids: torch.Tensor, tgt_mask: torch.Tensor) -> torch.Tensor:
        """Target-language ids / mask (B, T) -> (B, D) features in CLIP's text space (not normalised)."""
        with torch.no_grad():
            tokens = self.encoder(input_ids=tgt_ids, attention_mask=tgt_mask).last_hidden_state  # (B, T, H)
        x = self.down(tokens)  # (B, T, hidden)
        pad = tgt_mask == 0  # (B, T) True = padding
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.norm(x)
        if self.cfg.pool == "cls":
            pooled = x[:, 0]
        else:
            keep = tgt_mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.up(pooled)  # (B, D)

    @torch.no_grad()
    def teacher(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """English ids / mask (B, S) -> CLIP's text features (B, D), not normalised."""
        return _text_features(self.clip.get_text_features(input_ids=src_ids, attention_mask=src_mask))

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.cfg.loss == "mse":
            return F.mse_loss(student, teacher)
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()

    def forward(self, src_ids: torch.Tensor, src_mask: torch.Tensor, tgt_ids: torch.Tensor,
                tgt_mask: torch.Tensor) -> torch.Tensor:
        return self.distance(self.student(tgt_ids, tgt_mask), self.teacher(src_ids, src_mask))

    # ------------------------------------------------------------ evaluation (unit norm)

    def encode_text(self, tgt_ids: torch.Tensor, tgt_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.student(tgt_ids, tgt_mask), dim=-1)

    @torch.no_grad()
    def encode_teacher(self, src_ids: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.teacher(src_ids, src_mask), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        return F.normalize(_text_features(self.clip.get_image_features(pixel_values=images)), dim=-1)
