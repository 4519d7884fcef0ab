"""CLIP dual encoder (transformers CLIPModel) with adapters in both towers.

forward(images, input_ids, attention_mask) -> the training loss:
  contrastive_weight * (InfoNCE with learnable temperature | MPM-NCE)
  + mim_weight * masked image modelling (random patches zeroed at the input, a light linear
    decoder predicts their normalised pixels from the vision tower's patch tokens, L1)
  + mlm_weight * masked language modelling (15% of caption tokens; a linear head on the
    text tower's tokens)
Captions identical in the batch are each other's positives for MPM-NCE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from dodo import losses
from dodo.adapters.film import FiLMCondition
from dodo.adapters.inject import Block, freeze, inject
from dodo.adapters.transfer import AdapterSource, start_from_sources
from dodo.models.clip.config import ClipModelConfig
from dodo.models.registry import InitState


def clip_block_specs(clip: CLIPModel, prefix: str = "") -> list[Block]:
    """Every encoder layer of both towers: attention self_attn (out_proj), MLP mlp (fc2)."""
    blocks = []
    for tower, sub in (("vision", clip.vision_model), ("text", clip.text_model)):
        c = sub.config
        for i in range(len(sub.encoder.layers)):
            blocks.append(Block(f"{prefix}{tower}_model.encoder.layers.{i}", tower, i, c.hidden_size,
                                c.num_attention_heads, "self_attn", "self_attn.out_proj", ["mlp"], ["mlp.fc2"]))
    return blocks


def build_clip(cfg: ClipModelConfig, vocab_size: int, eos_token_id: int) -> CLIPModel:
    c = cfg.clip
    if c.path:
        return CLIPModel.from_pretrained(c.path, local_files_only=True, attn_implementation="eager")
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=c.text_hidden, intermediate_size=4 * c.text_hidden,
                         num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
                         max_position_embeddings=c.max_text_len, eos_token_id=eos_token_id,
                         pad_token_id=eos_token_id, bos_token_id=eos_token_id, projection_dim=c.projection_dim),
        vision_config=dict(image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.vision_hidden,
                           intermediate_size=4 * c.vision_hidden, num_hidden_layers=c.vision_layers,
                           num_attention_heads=c.vision_heads, projection_dim=c.projection_dim),
        projection_dim=c.projection_dim, logit_scale_init_value=math.log(1 / c.init_temperature))
    config._attn_implementation = "eager"
    return CLIPModel(config)


def build(cfg: ClipModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init: InitState | None = None) -> "ClipDualEncoder":
    """The family's model builder (FamilySpec.model)."""
    return ClipDualEncoder(cfg, vocab_size, eos_token_id, mask_token_id,
                           init_adapters=init.adapters if init is not None else None)


class ClipDualEncoder(nn.Module):
    def __init__(self, cfg: ClipModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
                 init_adapters: list[AdapterSource] | None = None):
        """``init_adapters``: adapters of earlier runs (model.clip.init_adapters), read by the
        train layer (dodo/train/init_from.py); injected and frozen before this run's own."""
        super().__init__()
        c = cfg.clip
        self.cfg = c
        self.clip = build_clip(cfg, vocab_size, eos_token_id)
        self.vocab_size = self.clip.config.text_config.vocab_size
        self.eos_token_id = eos_token_id
        self.mask_token_id = eos_token_id if mask_token_id is None else mask_token_id
        if "all" not in c.trainable:
            freeze(self.clip)
            if "projections" in c.trainable:
                for m in (self.clip.visual_projection, self.clip.text_projection):
                    m.weight.requires_grad_(True)
        # The temperature as shape (1,): DeepSpeed cannot broadcast CLIP's 0-dim parameter.
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1).clone(),
                                             requires_grad="temperature" in c.trainable or "all" in c.trainable)
        self.film_condition = None
        if cfg.adapter.kind == "film":  # condition: task (ClipModelConfig refuses image at submit)
            self.film_condition = FiLMCondition(cfg.adapter.film.task_dim, cfg.adapter.film.num_tasks)
        self.init_adapters: dict[str, list[str]] = {}
        if init_adapters:  # frozen adapters of earlier runs first (masked adapters' transfer)
            self.init_adapters = start_from_sources(
                self, init_adapters, lambda a: inject(self.clip, clip_block_specs(self.clip), a))
        self.adapted_modules = inject(self.clip, clip_block_specs(self.clip), cfg.adapter, self.film_condition)
        vision = self.clip.config.vision_config
        self.patch = vision.patch_size
        if c.mim_weight > 0 or c.objective == "mim":  # light decoder: patch token -> its pixels
            self.mim_decoder = nn.Linear(vision.hidden_size, vision.patch_size ** 2 * 3)
            self.mask_embedding = nn.Parameter(torch.zeros(3, 1, 1))
        if c.mlm_weight > 0 or c.objective == "mlm":
            self.mlm_head = nn.Linear(self.clip.config.text_config.hidden_size, self.vocab_size)

    def _task(self, batch: int, device: torch.device) -> None:
        if self.film_condition is not None:
            self.film_condition.set_task(torch.zeros(batch, dtype=torch.long, device=device))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D), unit norm
        self._task(images.shape[0], images.device)
        out = self.clip.get_image_features(pixel_values=images)  # transformers 5: pooler_output is projected
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._task(input_ids.shape[0], input_ids.device)
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                image_ids: torch.Tensor | None = None, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        """``sample_index`` (B,): the pairs' training-set rows, given with hard-sample training
        (model.clip.hard_samples, task_hard.py attaches ``hard_bank``): weighted loss + bank update.
        ``image_ids`` (B,), when the batch has them: captions of one image (or texts of one
        class) are each other's positives; without them InfoNCE is CLIP's and MPM-NCE takes
        identical captions as positives. ``images`` is None on a text-only cache (objective mlm)."""
        c = self.cfg
        if c.objective == "mim":  # a pretext task alone (dodo/models/clip/task_masked.py)
            return self.mim(images)[0]
        if c.objective == "mlm":
            return self.mlm(input_ids, attention_mask)[0]
        loss = images.new_zeros(())
        if c.contrastive_weight > 0:
            img, txt = self.encode_image(images), self.encode_text(input_ids, attention_mask)
            if c.loss == "infonce":
                scale = self.clip.logit_scale.exp().clamp(max=100.0)
                bank = getattr(self, "hard_bank", None)
                if bank is not None and sample_index is not None:
                    loss = loss + c.contrastive_weight * bank.weighted_loss(img, txt, scale, image_ids, sample_index)
                else:
                    loss = loss + c.contrastive_weight * losses.info_nce(img, txt, scale, positive_ids=image_ids)
            else:
                positives = same_caption(input_ids, attention_mask) if image_ids is None else \
                    losses.positives_from_ids(image_ids)
                loss = loss + c.contrastive_weight * losses.mpm_nce(
                    img, txt, positives, c.mpm_eps, c.mpm_delta, c.mpm_tau)
        if c.mim_weight > 0:
            loss = loss + c.mim_weight * self.mim(images)[0]
        if c.mlm_weight > 0:
            loss = loss + c.mlm_weight * self.mlm(input_ids, attention_mask)[0]
        return loss

    def mim(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mask): masked patches are replaced by a learned colour at the input."""
        b, _, h, w = images.shape
        n = (h // self.patch) * (w // self.patch)
        mask = losses.random_patch_mask(b, n, self.cfg.mim_mask_ratio, device=images.device)  # (B, N)
        pixel_mask = mask.view(b, 1, h // self.patch, w // self.patch).float()
        pixel_mask = pixel_mask.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)
        corrupted = images * (1 - pixel_mask) + self.mask_embedding * pixel_mask
        self._task(b, images.device)
        tokens = self.clip.vision_model(pixel_values=corrupted).last_hidden_state[:, 1:]  # (B, N, d)
        return losses.mim_loss(self.mim_decoder(tokens), images, mask, self.patch), mask

    def mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(loss, accuracy on the masked tokens). The text tower is causal, as in CLIP."""
        masked, labels = losses.mask_tokens(input_ids, attention_mask, self.mask_token_id, self.vocab_size,
                                            [self.eos_token_id], self.cfg.mlm_prob)
        self._task(input_ids.shape[0], input_ids.device)
        tokens = self.clip.text_model(input_ids=masked, attention_mask=attention_mask).last_hidden_state
        logits = self.mlm_head(tokens)  # (B, T, V)
        return losses.mlm_loss(logits, labels), losses.mlm_accuracy(logits, labels)


def same_caption(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j carry the same caption (their positives for MPM-NCE)."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)
