"""VLMo-style multiway transformer: one stack of blocks with shared self-attention and
per-modality feed-forward experts, used as a dual encoder (retrieval, ITC) and as a fusion
encoder (image-text matching, MLM, classification).

Block (pre-norm, LayerScale gamma_1 / gamma_2 initialised to ``layer_scale_init``)::

    x = x + gamma_1 * Attn(LN(x))                       shared by every modality
    x = x + gamma_2 * FFN_m(LN_m(x))                    the expert of modality m

Routing (``modality`` argument of ``MultiwayBlock.forward``):
  image  image-only input: every token to the image expert, in every block
  text   text-only input: every token to the text expert, in every block
  vl     image-text input [text CLS, text, image CLS, patches]: in blocks below
         ``vlffn_start`` text tokens go to the text expert and image tokens to the image
         expert; from ``vlffn_start`` on every token goes to the vision-language expert.
Blocks from ``vlffn_start`` on hold all three experts (the dual encoder still uses the image
and text experts there). Attention in the fused input spans both modalities.

forward(images, input_ids, attention_mask) -> the training loss:
  contrastive_weight * ITC (InfoNCE, learnable temperature, on the image / text [CLS])
  + itm_weight * ITM (fusion encoder; per image a hard-negative text and per text a
    hard-negative image, drawn from the softmax of the ITC similarities, positives excluded)
  + mlm_weight * MLM (15% of the caption tokens of the fused input)
Captions identical in the batch are each other's positives (never drawn as negatives).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dodo import losses
from dodo.adapters.inject import Block, freeze, inject
from dodo.models.registry import InitState
from dodo.models.vlmo.config import VlmoModelConfig

TEXT, IMAGE = 0, 1  # token-type ids


class Attention(nn.Module):
    """Multi-head self-attention shared by the modalities; key_mask (B, L) bool, True = attend."""

    def __init__(self, d: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))  # (B, H, L, dh)
        mask = None if key_mask is None else key_mask[:, None, None, :].bool()  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Expert(nn.Module):
    """One modality's LayerNorm + FFN (d -> mlp_ratio d -> d, GELU)."""

    def __init__(self, d: int, mlp_ratio: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class MultiwayBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, with_vl: bool, layer_scale_init: float,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        names = ("image", "text", "vl") if with_vl else ("image", "text")
        self.experts = nn.ModuleDict({m: Expert(d, mlp_ratio, dropout) for m in names})
        self.gamma_1 = nn.Parameter(torch.full((d,), layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((d,), layer_scale_init))

    def forward(self, x: torch.Tensor, modality: str, n_text: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d). modality image | text | vl; for vl the first n_text tokens are text."""
        x = x + self.gamma_1 * self.attn(self.norm1(x), key_mask)
        if modality in ("image", "text"):
            return x + self.gamma_2 * self.experts[modality](x)
        if modality != "vl":
            raise ValueError(f"modality must be image, text or vl, got {modality!r}")
        if "vl" in self.experts:
            return x + self.gamma_2 * self.experts["vl"](x)
        t, i = x[:, :n_text], x[:, n_text:]
        return torch.cat([t + self.gamma_2 * self.experts["text"](t),
                          i + self.gamma_2 * self.experts["image"](i)], dim=1)


def vlmo_block_specs(model: "VlmoModel") -> list[Block]:
    """Every block (tower "fusion"): attention attn (out_proj), MLP = the blocks' experts (fc2)."""
    specs = []
    for i, blk in enumerate(model.blocks):
        experts = list(blk.experts)
        specs.append(Block(f"blocks.{i}", "fusion", i, model.hidden, model.heads, "attn", "attn.out_proj",
                           [f"experts.{m}" for m in experts], [f"experts.{m}.fc2" for m in experts]))
    return specs


def build(cfg: VlmoModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init: InitState | None = None) -> "VlmoModel":
    """The family's model builder (FamilySpec.model); VLMo starts from no other run's tensors."""
    return VlmoModel(cfg, vocab_size, eos_token_id, mask_token_id)


class VlmoModel(nn.Module):
    def __init__(self, cfg: VlmoModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None):
        super().__init__()
        c = self.cfg = cfg.vlmo
        d = self.hidden = c.hidden
        self.heads, self.patch = c.heads, c.patch_size
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.mask_token_id = eos_token_id if mask_token_id is None else mask_token_id
        n_patches = (c.image_size // c.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, d))
        self.image_pos = nn.Parameter(torch.zeros(1, 1 + n_patches, d))
        self.word_embed = nn.Embedding(vocab_size, d)
        self.text_cls = nn.Parameter(torch.zeros(1, 1, d))
        self.text_pos = nn.Parameter(torch.zeros(1, 1 + c.max_text_len, d))
        self.type_embed = nn.Embedding(2, d)
        self.blocks = nn.ModuleList(MultiwayBlock(d, c.heads, c.mlp_ratio, i >= c.vlffn_start, c.layer_scale_init,
                                                  c.dropout) for i in range(c.layers))
        self.norm = nn.LayerNorm(d)
        self.apply(_init_weights)
        for p in (self.image_cls, self.image_pos, self.text_cls, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)
        if c.frozen:
            freeze(self)  # the multiway transformer; the heads below and the adapters train
        # Heads: ITC projections + temperature (dual encoder), ITM pooler + classifier (fusion).
        self.itc_image, self.itc_text = nn.Linear(d, d), nn.Linear(d, d)
        # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / c.init_temperature)))
        self.itm_pooler, self.itm_head = nn.Linear(d, d), nn.Linear(d, 2)
        heads = [self.itc_image, self.itc_text, self.itm_pooler, self.itm_head]
        if c.mlm_weight > 0:
            self.mlm_head = nn.Linear(d, vocab_size)
            heads.append(self.mlm_head)
        for h in heads:
            h.apply(_init_weights)
        # prefix / mam / film are refused at submit (VlmoModelConfig: FamilySpec.refused_adapters)
        self.adapted_modules = inject(self, vlmo_block_specs(self), cfg.adapter)

    # ---------------------------------------------------------------- embeddings and the stack

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, d): [image CLS, patches] + positions + type."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px but model.vlmo.image_size="
                             f"{self.cfg.image_size}; make data.image_size and model.vlmo.image_size agree")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d)
        x = torch.cat([self.image_cls.expand(len(x), -1, -1), x], dim=1) + self.image_pos
        return x + self.type_embed.weight[IMAGE]

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> ((B, 1 + T, d) [text CLS, tokens], (B, 1 + T) bool key mask)."""
        b, t = input_ids.shape
        if t > self.cfg.max_text_len:
            raise ValueError(f"captions of {t} tokens exceed model.vlmo.max_text_len={self.cfg.max_text_len}; "
                             "raise it or lower data.max_caption_tokens")
        x = torch.cat([self.text_cls.expand(b, -1, -1), self.word_embed(input_ids)], dim=1) + self.text_pos[:, : t + 1]
        mask = torch.cat([attention_mask.new_ones(b, 1), attention_mask], dim=1).bool()
        return x + self.type_embed.weight[TEXT], mask

    def run(self, x: torch.Tensor, modality: str, n_text: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, modality, n_text, key_mask)
        return self.norm(x)

    # ---------------------------------------------------------------- dual encoder

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, d), unit norm
        return F.normalize(self.itc_image(self.run(self.embed_image(images), "image")[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x, mask = self.embed_text(input_ids, attention_mask)
        return F.normalize(self.itc_text(self.run(x, "text", key_mask=mask)[:, 0]), dim=-1)

    # ---------------------------------------------------------------- fusion encoder

    def fuse(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T + 1 + N, d): the jointly encoded [text CLS, text, image CLS, patches]."""
        t, t_mask = self.embed_text(input_ids, attention_mask)
        i = self.embed_image(images)
        mask = torch.cat([t_mask, t_mask.new_ones(i.shape[:2])], dim=1)
        return self.run(torch.cat([t, i], dim=1), "vl", n_text=t.shape[1], key_mask=mask)

    def itm_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) match logits (column 1 = matched) from the fused text CLS token."""
        h = self.fuse(images, input_ids, attention_mask)[:, 0]
        return self.itm_head(torch.tanh(self.itm_pooler(h)))

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.itm_logits(images, input_ids, attention_mask).float()
        return logits[:, 1] - logits[:, 0]  # (B,) log-odds of a match

    # ---------------------------------------------------------------- training objective

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``image_ids`` (B,), when the batch has them: captions of one image are positives of
        each other in ITC and never drawn as ITM negatives (nor are identical captions)."""
        c, loss = self.cfg, images.new_zeros(())
        scale = self.logit_scale.exp().clamp(max=100.0)
        if c.contrastive_weight > 0 or c.itm_weight > 0:
            img, txt = self.encode_image(images), self.encode_text(input_ids, attention_mask)
            if c.contrastive_weight > 0:
                loss = loss + c.contrastive_weight * losses.info_nce(img, txt, scale, positive_ids=image_ids)
        if c.itm_weight > 0:
            positives = same_caption(input_ids, attention_mask)  # (B, B)
            if image_ids is not None:
                positives = positives | losses.positives_from_ids(image_ids)
            neg_txt, neg_img = losses.hard_negatives(scale.detach() * img.detach() @ txt.detach().T, positives)
            b = len(images)
            logits = self.itm_logits(torch.cat([images, images, images[neg_img]]),
                                     torch.cat([input_ids, input_ids[neg_txt], input_ids]),
                                     torch.cat([attention_mask, attention_mask[neg_txt], attention_mask]))
            loss = loss + c.itm_weight * losses.itm_loss(logits[:b], logits[b:])
        if c.mlm_weight > 0:
            loss = loss + c.mlm_weight * self.mlm(images, input_ids, attention_mask)[0]
        return loss

    def mlm(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(loss, accuracy on the masked tokens) of the fused input with masked caption tokens."""
        masked, labels = losses.mask_tokens(input_ids, attention_mask, self.mask_token_id, self.vocab_size,
                                            [self.eos_token_id], self.cfg.mlm_prob)
        h = self.fuse(images, masked, attention_mask)[:, 1: 1 + input_ids.shape[1]]  # the caption tokens
        logits = self.mlm_head(h)
        return losses.mlm_loss(logits, labels), losses.mlm_accuracy(logits, labels)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def same_caption(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j carry the same caption."""
    ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (ids[:, None, :] == ids[None, :, :]).all(-1)
