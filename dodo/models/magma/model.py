"""A MAGMA-style prefix LM: image encoder -> prefix projection -> frozen causal LM with adapters.

The image encoder's patch tokens are projected to the LM width (model.image_prefix: MAGMA's
Linear -> Dropout -> LayerNorm per token, or LiMBeR's single Linear, per token or from the mean
feature to k soft prompts) and placed before the caption's token embeddings; the LM is trained (through its adapters only)
to predict the caption. Labels are ignored on image positions and on padding.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GPT2Config,
                          GPTJConfig, GPTNeoConfig, PreTrainedModel, ViTConfig, ViTModel)

from dodo.adapters.film import FiLMCondition
from dodo.adapters.inject import freeze, inject_adapters
from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig
from dodo.models.registry import InitState

IGNORE_INDEX = -100


def _require_dir(path: str, key: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{key}={path!r} is not a directory; point it at a local copy of "
                                "the pretrained weights (nothing is downloaded at run time)")


# GPT-2 / GPT-Neo / GPT-J's `gelu_new` is the tanh approximation of GELU written as separate
# ops; torch's fused tanh GELU is the same function (max difference 4.8e-7 forward, 1.1e-6 in the
# gradient over N(0, 16) inputs) and 2.8x faster forward + backward on CPU (docs/benchmarks.md).
FUSED_ACTIVATION = {"gelu_new": "gelu_pytorch_tanh"}


def build_lm(cfg: LMConfig, vocab_size: int, eos_token_id: int) -> PreTrainedModel:
    """A causal LM from local weights, or randomly initialised from the configured sizes."""
    if cfg.source.kind != "random":  # model.lm.source (docs/models.md): frozen, eval, dtype per device
        from dodo.models.sources import load_source
        from dodo.models.sources.hf import check_tokenizer_vocab
        lm = load_source(dataclasses.replace(cfg.source, tower="lm"), "model.lm.source")
        rows = lm.get_input_embeddings().num_embeddings
        check_tokenizer_vocab(vocab_size, rows)
        if rows < vocab_size:  # the added <|image|> token
            lm.resize_token_embeddings(vocab_size)
        return lm
    if cfg.path:
        _require_dir(cfg.path, "model.lm.path")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        if getattr(config, "activation_function", None) in FUSED_ACTIVATION:
            config.activation_function = FUSED_ACTIVATION[config.activation_function]
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, config=config, local_files_only=True)
        if lm.get_input_embeddings().num_embeddings < vocab_size:  # the added <|image|> token
            lm.resize_token_embeddings(vocab_size)
        return lm
    # Random init: dropout off, since the base is frozen and only adds noise here.
    ids = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
               initializer_range=cfg.init_std, activation_function=FUSED_ACTIVATION["gelu_new"])
    if cfg.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif cfg.arch == "gpt_neo":
        config = GPTNeoConfig(vocab_size=vocab_size, max_position_embeddings=cfg.n_positions,
                              hidden_size=cfg.d_model, num_layers=cfg.n_layer, num_heads=cfg.n_head,
                              attention_types=[[["global"], cfg.n_layer]],
                              resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0, **ids)
    else:
        config = GPTJConfig(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, rotary_dim=cfg.rotary_dim,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    return AutoModelForCausalLM.from_config(config)


class ImageEncoder(nn.Module):
    """Image -> a sequence of patch features (B, N, hidden); the CLS token is dropped."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.tokens = cfg.source.kind in ("open_clip", "timm")  # those towers return (B, N, C) themselves
        if cfg.source.kind != "random":  # model.image_encoder.source (docs/models.md)
            from dodo.models.sources import load_source
            self.net = load_source(dataclasses.replace(cfg.source, tower="vision"), "model.image_encoder.source")
            self.hidden = self.net.hidden if self.tokens else self.net.config.hidden_size
            for p in self.net.parameters():  # MAGMA trains its encoder with a small lr
                p.requires_grad_(cfg.trainable)
            return
        if cfg.arch == "vit":
            if cfg.path:
                _require_dir(cfg.path, "model.image_encoder.path")
                self.net = ViTModel.from_pretrained(cfg.path, add_pooling_layer=False, local_files_only=True)
            else:
                self.net = ViTModel(ViTConfig(
                    image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden,
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                    intermediate_size=4 * cfg.hidden), add_pooling_layer=False)
        else:
            if cfg.path:
                _require_dir(cfg.path, "model.image_encoder.path")
                self.net = CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True)
            else:
                self.net = CLIPVisionModel(CLIPVisionConfig(
                    image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden,
                    num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                    intermediate_size=4 * cfg.hidden))
        self.hidden = self.net.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, N, hidden)
        if self.tokens:
            return self.net(images).to(images.dtype)
        return self.net(pixel_values=images).last_hidden_state[:, 1:]


class PooledLinearPrefix(nn.Module):
    """LiMBeR's map to k soft prompts: the mean image feature (B, enc) -> Linear enc -> k * d
    -> (B, k, d). Its only parameters are the Linear's weight (k*d, enc) and bias (k*d,)."""

    def __init__(self, enc: int, d_model: int, tokens: int):
        super().__init__()
        self.tokens, self.d_model = tokens, d_model
        self.proj = nn.Linear(enc, tokens * d_model)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, N, enc) or pooled (B, enc) -> (B, k, d)
        pooled = features if features.dim() == 2 else features.mean(1)  # (B, enc)
        return self.proj(pooled).view(features.shape[0], self.tokens, self.d_model)


def build_prefix(cfg: MagmaModelConfig, enc: int, d_model: int) -> nn.Module:
    """model.image_prefix: (B, N, enc) image features -> (B, P, d_model) LM input embeddings."""
    p = cfg.image_prefix
    if p.kind == "magma":  # MAGMA's projection (state keys prefix.0 / prefix.2)
        return nn.Sequential(nn.Linear(enc, d_model), nn.Dropout(cfg.prefix_dropout), nn.LayerNorm(d_model))
    if p.tokens:
        return PooledLinearPrefix(enc, d_model, p.tokens)
    return nn.Sequential(nn.Linear(enc, d_model))  # LiMBeR per image token: one Linear, nothing else


def build(cfg: MagmaModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init: InitState | None = None) -> "MagmaModel":
    """The family's model builder (FamilySpec.model); a causal LM masks nothing."""
    return MagmaModel(cfg, vocab_size, eos_token_id, dense_state=init.dense_state if init is not None else None)


class MagmaModel(nn.Module):
    def __init__(self, cfg: MagmaModelConfig, vocab_size: int, eos_token_id: int,
                 dense_state: dict[str, torch.Tensor] | None = None):
        """``dense_state``: model.moe.upcycle_from's trainable state, read by the train layer
        (dodo/train/init_from.py); every expert starts as a copy of its dense adapter."""
        super().__init__()
        self.eos_token_id = eos_token_id
        self.image_encoder = ImageEncoder(cfg.image_encoder)
        self.lm = build_lm(cfg.lm, vocab_size, eos_token_id)
        d_model = self.lm.get_input_embeddings().embedding_dim
        self.prefix = build_prefix(cfg, self.image_encoder.hidden, d_model)
        # Freeze the base explicitly (MAGMA's own freeze path never did: a known bug), then add
        # adapters, which are created trainable.
        freeze(self.lm)
        if not cfg.image_encoder.trainable:
            freeze(self.image_encoder)
        # FiLM: every LM layer modulated by the image's mean patch feature (or a task embedding).
        film = cfg.adapter.film
        self.film_condition = None
        if cfg.adapter.kind == "film":
            self.film_condition = (FiLMCondition(self.image_encoder.hidden) if film.condition == "image"
                                   else FiLMCondition(film.task_dim, film.num_tasks))
        self.adapted_modules = inject_adapters(self.lm, cfg.adapter, d_model, self.film_condition)
        # Mixture-of-experts adapters in place of the dense ones of model.moe.layers (None: off).
        self.moe = None
        if cfg.moe.enabled:
            from dodo.moe.inject import attach_moe, upcycle  # imports DeepSpeed's MoE
            self.moe = attach_moe(self.lm, cfg.moe, cfg.adapter, d_model, vocab_size)
            if dense_state is not None:
                upcycle(self, dense_state, cfg.moe.upcycle_noise, seed=cfg.init_seed)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), normalised as in training -> the image prefix (B, P, d).
        Also conditions FiLM on these images (their mean patch feature, or task 0): in an
        interleaved prompt the last image embedded conditions the generation."""
        features = self.image_encoder(images)  # (B, N, enc)
        if self.film_condition is not None:
            if self.film_condition.tasks is None:
                self.film_condition.set(features.mean(1))  # (B, enc)
            else:
                self.film_condition.set_task(torch.zeros(len(images), dtype=torch.long, device=images.device))
        return self.prefix(features)  # (B, P, d)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the frozen LM's input embeddings (B, T, d)."""
        return self.lm.get_input_embeddings()(input_ids)

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        prefix = self.embed_image(images)  # (B, P, d)
        if self.moe is not None:  # hash / modality routers read the token ids
            self.moe.set_tokens(input_ids, prefix.shape[1])
        text = self.embed_tokens(input_ids)  # (B, T, d)
        return torch.cat([prefix, text.to(prefix.dtype)], dim=1)  # (B, P + T, d)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean caption loss over the caption tokens and their EOS; padding is ignored.
        ``image_ids`` (when the batch carries them) play no part in captioning."""
        embeds = self.embed(images, input_ids)
        n_prefix = embeds.shape[1] - input_ids.shape[1]
        mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n_prefix), attention_mask], dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits  # (B, P + T, V)
        # Position P-1+t predicts text token t: the last image token predicts the first word.
        text_logits = logits[:, n_prefix - 1:-1]  # (B, T, V)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        loss = F.cross_entropy(text_logits.float().reshape(-1, text_logits.shape[-1]),
                               labels.reshape(-1), ignore_index=IGNORE_INDEX)
        if self.moe is not None:  # the routers' weighted balance and z-losses, training only
            aux = self.moe.aux_loss()
            loss = loss + aux.to(loss.device) if self.training else loss
        return loss

    def step_metrics(self) -> dict[str, object]:
        """Collective: MoE routing statistics since the last call (the loop logs them)."""
        return self.moe.step_metrics() if self.moe is not None else {}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_tokens: int = 16) -> list[list[int]]:
        """Greedy captions, one token list per image (EOS excluded)."""
        input_ids = images.new_zeros(images.shape[0], 0, dtype=torch.long)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(max_tokens):
            logits = self.lm(inputs_embeds=self.embed(images, input_ids)).logits[:, -1]  # (B, V)
            next_id = logits.argmax(-1)
            next_id = next_id.masked_fill(done, self.eos_token_id)
            input_ids = torch.cat([input_ids, next_id[:, None]], dim=1)
            done |= next_id == self.eos_token_id
            if bool(done.all()):
                break
        return [row[:self._eos_at(row)].tolist() for row in input_ids]

    def _eos_at(self, row: torch.Tensor) -> int:
        hits = (row == self.eos_token_id).nonzero()
        return int(hits[0]) if len(hits) else len(row)
