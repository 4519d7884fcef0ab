"""WeakModel: a timm ViT (DINO / MAE) with a frozen text encoder, weakly supervised by language.

objective mae_contrastive (adapters / token replay in the ViT train, with the heads):
  loss = mae_weight * MSE(masked patches' normalised pixels; encoder on the visible tokens,
         light decoder)                                            (MAE, He et al. 2022)
       + contrastive_weight * InfoNCE(image proj([CLS]) of the full image, text proj(frozen text
         embedding)), image-id positives, learnable temperature (CLIP / dodo.losses.info_nce)
  FiLM adapters take a language condition (adapter.film.condition=text): the frozen text
  encoder's embedding of adapter.film.prompt, or, with film.caption, of each sample's caption
  in the MAE pass (the contrastive pass always sees the prompt: a caption-conditioned image
  embedding would let InfoNCE read the answer off its own condition).
objective reprogram: frozen everything; X_adv = pad(x) + tanh(W * M) (reprogram.py); the frozen
  model's source logits over text classes, mapped to the target labels; cross-entropy.
objective cross_modal: frozen everything; the captions' token embeddings -> TokenMap -> the ViT
  in place of its patch embeddings; the same source logits and label map.

Texts that the model needs besides the batch (the FiLM prompt, the source classes) are
tokenised by the task, which owns the tokenizer, and given to ``attach_texts``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dodo import losses
from dodo.adapters.film import FiLMCondition
from dodo.adapters.inject import freeze, inject
from dodo.adapters.transfer import AdapterSource, start_from_sources
from dodo.models.registry import InitState
from dodo.models.weak.config import WeakModelConfig
from dodo.models.weak.replay import TokenReplay
from dodo.models.weak.reprogram import AdversarialProgram, LabelMap, TokenMap
from dodo.models.weak.vit import ViTRunner, build_vit, vit_block_specs

Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # texts -> (ids, mask) (N, T)


def build(cfg: WeakModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init: InitState | None = None) -> "WeakModel":
    """The family's model builder (FamilySpec.model); the loop seeds model.init_seed first."""
    del mask_token_id
    return WeakModel(cfg, vocab_size, eos_token_id, init.adapters if init is not None else None)


def build_text_encoder(cfg: WeakModelConfig, vocab_size: int, eos_token_id: int) -> nn.Module:
    """The frozen text encoder: a local HF directory, or a tiny random CLIP text tower."""
    w = cfg.weak
    if w.text.kind == "hf":
        from dodo.models.sources import load_source
        return load_source(w.text, "model.weak.text").float()
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=w.text_hidden, intermediate_size=4 * w.text_hidden,
                            num_hidden_layers=w.text_layers, num_attention_heads=w.text_heads,
                            max_position_embeddings=w.max_text_len, eos_token_id=eos_token_id,
                            pad_token_id=eos_token_id, bos_token_id=eos_token_id)
    config._attn_implementation = "eager"
    text = CLIPTextModel(config).eval()
    freeze(text)
    return text


def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int,
             norm_pix: bool = True) -> torch.Tensor:
    """MAE's loss: MSE between predicted and true pixels of the masked patches, each target
    patch normalised by its own mean and variance (``norm_pix``). pred: (B, N, p*p*3); mask (B, N)."""
    target = losses.patchify(images, patch)  # (B, N, p*p*3)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, N)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1)


class MAEDecoder(nn.Module):
    """Visible tokens (B, 1 + K, d) + mask tokens at the dropped positions -> (B, N, p*p*3)."""

    def __init__(self, d: int, n_patches: int, patch: int, dim: int, layers: int, heads: int):
        super().__init__()
        from dodo.models.sources.libs import import_timm
        from timm.models.vision_transformer import Block
        import_timm()
        self.embed = nn.Linear(d, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Learned positions (MAE uses fixed 2-D sin-cos; learned ones are as good at this size).
        self.pos = nn.Parameter(torch.randn(1, 1 + n_patches, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, qkv_bias=True) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * 3)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
        x = self.embed(visible)  # (B, 1 + K, dim)
        b, dim = x.shape[0], x.shape[-1]
        full = self.mask_token.expand(b, n, dim).clone()  # (B, N, dim)
        full.scatter_(1, keep[..., None].expand(-1, -1, dim), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # (B, N, p*p*3)


class WeakModel(nn.Module):
    def __init__(self, cfg: WeakModelConfig, vocab_size: int, eos_token_id: int,
                 sources: list[AdapterSource] | None = None):
        """``sources``: model.weak.reprogram.init_from's trainable state (read by the train layer,
        dodo/train/init_from.py): its adapters, projections and temperature, loaded frozen."""
        super().__init__()
        w = cfg.weak
        self.cfg, self.objective = w, w.objective
        self.vit = build_vit(w.vision)
        self.runner = ViTRunner(self.vit)
        self.text = build_text_encoder(cfg, vocab_size, eos_token_id)
        d, t = self.vit.embed_dim, self.text.config.hidden_size
        self.canvas = self.vit.patch_embed.img_size[0]
        self.film_condition = FiLMCondition(t) if cfg.adapter.kind == "film" else None
        self.film = cfg.adapter.film
        self.adapted_modules = inject(self, vit_block_specs(self.vit), cfg.adapter, self.film_condition)
        self.replay = (TokenReplay(d, len(self.vit.blocks), w.replay.source_layer, w.replay.target_layers,
                                   w.replay.tokens, w.replay.bottleneck, w.replay.gate_init)
                       if w.replay.enabled else None)
        self.image_proj = nn.Linear(d, w.projection_dim, bias=False)
        self.text_proj = nn.Linear(t, w.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / w.init_temperature)))
        if w.objective == "mae_contrastive":
            m = w.mae
            self.decoder = MAEDecoder(d, self.runner.num_patches, self.runner.patch, m.decoder_dim,
                                      m.decoder_layers, m.decoder_heads)
        else:  # reprogramming: the source model (ViT, text encoder, projections) is frozen
            for p in (*self.image_proj.parameters(), *self.text_proj.parameters(), self.logit_scale):
                p.requires_grad_(False)
            if w.objective == "reprogram":
                self.program = AdversarialProgram(self.canvas, w.reprogram.inner_size)
            else:
                self.token_map = TokenMap(self.text.get_input_embeddings().embedding_dim, d,
                                          w.reprogram.map, w.reprogram.map_hidden)
            self.label_map: LabelMap | None = None  # sized by attach_texts (needs the target classes)
        for src in sources or []:
            self._start_from(src)
        self.register_buffer("prompt_embedding", torch.zeros(t), persistent=False)
        self.register_buffer("source_embeddings", torch.zeros(0, w.projection_dim), persistent=False)

    def _start_from(self, src: AdapterSource) -> None:
        """A trained mae_contrastive run becomes the frozen source model: its adapters are
        injected and loaded (dodo.adapters.transfer), its projections and temperature copied."""
        if any(k.startswith("replay.") for k in src.state):
            raise ValueError(f"model.weak.reprogram.init_from: {src.source} trained token replay, which a "
                             "reprogramming run does not rebuild; reprogram a run without model.weak.replay")
        if src.adapter.kind != "none":
            if src.adapter.kind == "film":
                self.film_condition = FiLMCondition(self.text.config.hidden_size)
                self.film = src.adapter.film
            self.init_adapters = start_from_sources(
                self, [src], lambda a: inject(self, vit_block_specs(self.vit), a, self.film_condition))
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name in ("image_proj.weight", "text_proj.weight", "logit_scale"):
                if name not in src.state or src.state[name].shape != params[name].shape:
                    raise ValueError(f"model.weak.reprogram.init_from: {src.checkpoint} has no {name} of shape "
                                     f"{tuple(params[name].shape)}: not a mae_contrastive run of this model")
                params[name].copy_(src.state[name])

    # ------------------------------------------------------------ texts the task tokenises

    @torch.no_grad()
    def attach_texts(self, tokenize: Tokenize, source_classes: list[str] | None = None,
                     num_targets: int = 0) -> None:
        """The FiLM prompt's embedding; for reprogramming the source classes' (template-filled)
        projected embeddings and the label map onto ``num_targets`` classes."""
        self.prompt_embedding = self.text_features(*tokenize([self.film.prompt]))[0]
        if self.objective != "mae_contrastive":
            assert source_classes, "reprogramming needs source classes"
            r = self.cfg.reprogram
            texts = [r.template.format(c) for c in source_classes]
            embs = [self.text_features(*tokenize(texts[i:i + 256])) for i in range(0, len(texts), 256)]
            self.source_embeddings = F.normalize(self.text_proj(torch.cat(embs)), dim=-1)  # (K_s, P)
            self.label_map = LabelMap(len(texts), num_targets, r.label_map == "learned")

    # ------------------------------------------------------------ encoders

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, t): a CLIP tower's pooled (EOS) output, else the masked mean of the
        last hidden states (BERT: its pooler is an NSP head, not a sentence embedding)."""
        with torch.no_grad():
            out = self.text(input_ids=input_ids, attention_mask=attention_mask)
            if type(self.text).__name__.startswith("CLIPText"):
                return out.pooler_output.float()
            h, m = out.last_hidden_state.float(), attention_mask[..., None].float()
            return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def _condition(self, text: torch.Tensor | None = None) -> None:
        if self.film_condition is not None:
            self.film_condition.set_text(self.prompt_embedding if text is None else text)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 1 + N, d)
        self._condition()
        return self.runner.features(images, self.replay)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) unit norm; reprogramming: through the program / frozen model."""
        if self.objective == "reprogram":
            images = self.program(images)
        return F.normalize(self.image_proj(self.image_tokens(images)[:, 0]), dim=-1)

    def backbone_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, d) unit norm: the ViT's final-normed [CLS] (DINO's kNN feature)."""
        return F.normalize(self.image_tokens(images)[:, 0], dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)), dim=-1)

    # ------------------------------------------------------------ objectives

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.objective != "mae_contrastive":
            assert labels is not None, "reprogramming trains on labelled batches"
            return F.cross_entropy(self.target_logits(images, input_ids, attention_mask), labels)
        w, loss = self.cfg, images.new_zeros(())
        if w.mae_weight > 0:
            text = self.text_features(input_ids, attention_mask) if self.film.caption else None
            loss = loss + w.mae_weight * self.mae(images, text=text)[0]
        if w.contrastive_weight > 0:
            img, txt = self.encode_image(images), self.encode_text(input_ids, attention_mask)
            scale = self.logit_scale.exp().clamp(max=100.0)
            loss = loss + w.contrastive_weight * losses.info_nce(img, txt, scale, positive_ids=image_ids)
        return loss

    def mae(self, images: torch.Tensor, text: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, mask (B, N) bool): the encoder sees the visible patches only."""
        b, n = images.shape[0], self.runner.num_patches
        mask = losses.random_patch_mask(b, n, self.cfg.mae.mask_ratio, generator, images.device)
        keep = (~mask).nonzero()[:, 1].view(b, -1)  # (B, K) visible indices, ascending
        self._condition(text)
        x = self.runner.add_positions(self.runner.embed_images(images))
        visible = self.runner.tokens(x, keep=keep, replay=self.replay)  # (B, 1 + K, d)
        pred = self.decoder(visible, keep, n)
        return mae_loss(pred, images, mask, self.runner.patch, self.cfg.mae.norm_pix), mask

    def source_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """(B, d) [CLS] -> (B, K_s): the frozen model's scores over the source text classes."""
        z = F.normalize(self.image_proj(cls), dim=-1)
        return self.logit_scale.exp() * z @ self.source_embeddings.T

    def cross_modal_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, 1 + T, d) final tokens of the frozen ViT fed the mapped embeddings."""
        if input_ids.shape[1] > self.runner.num_patches:
            raise ValueError(f"cross-modal reprogramming: {input_ids.shape[1]} tokens exceed the ViT's "
                             f"{self.runner.num_patches} patch positions; lower data.max_caption_tokens")
        with torch.no_grad():
            emb = self.text.get_input_embeddings()(input_ids).float()  # (B, T, e), frozen
        x = self.runner.add_positions(self.token_map(emb))  # (B, 1 + T, d)
        keys = torch.cat([attention_mask.new_ones(attention_mask.shape[0], 1), attention_mask], 1).bool()
        return self.runner.tokens(x, attn_mask=keys[:, None, None, :])  # padding is never attended

    def target_logits(self, images: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.label_map is not None, "attach_texts sizes the label map first"
        if self.objective == "reprogram":
            cls = self.image_tokens(self.program(images))[:, 0]
        else:
            cls = self.cross_modal_tokens(input_ids, attention_mask)[:, 0]
        return self.label_map(self.source_logits(cls))
