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

``multiway: false`` (the `standard` transformer of the paper's ablation): every block holds one
shared FFN ("shared") that every token of every modality goes to.

forward(images, input_ids, attention_mask) -> the training loss of ``model.vlmo.stage``:
  mim  (images only) BEiT masked image modelling (pretrain.py: block-wise masks, visual tokens)
  mlm  (captions only) MLM on text-only input through the text expert
  vl   contrastive_weight * ITC (InfoNCE, learnable temperature, on the image / text [CLS],
       over the features of every rank: gather.py)
       + vl_itc_weight * ITC of the VL contrastive head (the top blocks through the VL expert)
       + itm_weight * ITM (fusion encoder; per image a hard-negative text and per text a
         hard-negative image from the whole global batch, drawn from the softmax of the ITC
         similarities, positives excluded)
       + mlm_weight * MLM (15% of the caption tokens of the fused input)
Captions identical in the batch are each other's positives (never drawn as negatives).
Fine-tuning heads (heads.py): ``vqa_logits`` and ``nlvr2_logits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dodo import losses
from dodo.adapters.inject import Block, freeze, inject
from dodo.models.registry import InitState
from dodo.models.vlmo import gather, pretrain
from dodo.models.vlmo.config import VlmoModelConfig
from dodo.models.vlmo.heads import Nlvr2Head, VqaHead, vqa_loss

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
                 dropout: float = 0.0, multiway: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        names = (("image", "text", "vl") if with_vl else ("image", "text")) if multiway else ("shared",)
        self.experts = nn.ModuleDict({m: Expert(d, mlp_ratio, dropout) for m in names})
        self.gamma_1 = nn.Parameter(torch.full((d,), layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((d,), layer_scale_init))

    def forward(self, x: torch.Tensor, modality: str, n_text: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d). modality image | text | vl; for vl the first n_text tokens are text."""
        x = x + self.gamma_1 * self.attn(self.norm1(x), key_mask)
        if "shared" in self.experts:  # the standard transformer: one FFN for every token
            return x + self.gamma_2 * self.experts["shared"](x)
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
    """The family's model builder (FamilySpec.model); ``init.weights``: the weights an earlier
    stage ended with (model.vlmo.init_from, read by the train layer)."""
    return VlmoModel(cfg, vocab_size, eos_token_id, mask_token_id, init.weights if init else None)


class VlmoModel(nn.Module):
    def __init__(self, cfg: VlmoModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
                 weights: dict[str, torch.Tensor] | None = None):
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
                                                  c.dropout, c.multiway) for i in range(c.layers))
        self.norm = nn.LayerNorm(d)
        self.apply(_init_weights)
        for p in (self.image_cls, self.image_pos, self.text_cls, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)
        if c.stage == "mim":  # BEiT: a learned [MASK] patch embedding, visual-token head and targets
            self.mim_token = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.trunc_normal_(self.mim_token, std=0.02)
            self.codebook = pretrain.RandomCodebook(3 * c.patch_size ** 2, c.mim_code_dim, c.mim_vocab,
                                                    c.mim_codebook_seed)
        if c.frozen:
            freeze(self)  # the multiway transformer; the heads below and the adapters train
        # Heads: ITC projections + temperature (dual encoder), ITM pooler + classifier (fusion).
        self.itc_image, self.itc_text = nn.Linear(d, d), nn.Linear(d, d)
        # Shape (1,), not (): DeepSpeed cannot broadcast 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / c.init_temperature)))
        self.itm_pooler, self.itm_head = nn.Linear(d, d), nn.Linear(d, 2)
        heads: list[nn.Module] = [self.itc_image, self.itc_text, self.itm_pooler, self.itm_head]
        if c.vl_itc_weight > 0:  # the VL contrastive head: own projections and temperature
            self.itc_vl_image, self.itc_vl_text = nn.Linear(d, d), nn.Linear(d, d)
            self.logit_vl_scale = nn.Parameter(torch.full((1,), math.log(1 / c.init_temperature)))
            heads += [self.itc_vl_image, self.itc_vl_text]
        if c.mlm_weight > 0 or c.stage == "mlm":
            self.mlm_head = nn.Linear(d, vocab_size)
            heads.append(self.mlm_head)
        if c.stage == "mim":
            self.mim_head = nn.Linear(d, c.mim_vocab)
            heads.append(self.mim_head)
        if c.vqa_answers > 0:
            self.vqa_head = VqaHead(d, c.vqa_answers)
            heads.append(self.vqa_head)
        if c.nlvr2:
            self.nlvr2_head = Nlvr2Head(d)
            heads.append(self.nlvr2_head)
        for h in heads:
            h.apply(_init_weights)
        self.loaded: list[str] = pretrain.load_stage_weights(self, weights) if weights else []
        if c.stage in ("mim", "mlm"):  # what the stage trains (pretrain.py); vl trains everything,
            pretrain.freeze_for_stage(self, c.stage)
        elif c.stage in ("vqa", "nlvr2"):  # vqa / nlvr2 all but what the fusion encoder never runs: the
            # pretraining heads and, in the VL blocks, the image / text experts. Frozen, so that (ZeRO's zero
            # gradients plus) weight decay does not shrink them: a later stage may read them.
            for h in heads:
                if h not in (getattr(self, "vqa_head", None), getattr(self, "nlvr2_head", None), self.itm_pooler):
                    h.requires_grad_(False)
            for blk in self.blocks:
                if "vl" in blk.experts:
                    blk.experts["image"].requires_grad_(False)
                    blk.experts["text"].requires_grad_(False)
            self.logit_scale.requires_grad_(False)
            if c.vl_itc_weight > 0:
                self.logit_vl_scale.requires_grad_(False)
        # prefix / mam / film are refused at submit (VlmoModelConfig: FamilySpec.refused_adapters)
        self.adapted_modules = inject(self, vlmo_block_specs(self), cfg.adapter)

    def lr_scale(self, name: str) -> float:
        """Learning-rate multiplier of parameter ``name`` (read by the optimizer's param groups):
        model.vlmo.head_lr_mult for the VQA / NLVR2 head, which starts from random weights."""
        return self.cfg.head_lr_mult if name.startswith(("vqa_head.", "nlvr2_head.")) else 1.0

    # ---------------------------------------------------------------- embeddings and the stack

    def embed_image(self, images: torch.Tensor, mim_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, d): [image CLS, patches] + positions + type; patches where
        ``mim_mask`` (B, N) is True replaced by the [MASK] embedding first (BEiT)."""
        if images.shape[-1] != self.cfg.image_size or images.shape[-2] != self.cfg.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} px but model.vlmo.image_size="
                             f"{self.cfg.image_size}; make data.image_size and model.vlmo.image_size agree")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d)
        if mim_mask is not None:
            x = torch.where(mim_mask[..., None], self.mim_token.to(x.dtype), x)
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

    def run(self, x: torch.Tensor, modality: str, n_text: int = 0, key_mask: torch.Tensor | None = None,
            start: int = 0, stop: int | None = None, norm: bool = True) -> torch.Tensor:
        """Blocks start..stop (default: all), then the final LayerNorm (``norm``)."""
        for blk in self.blocks[start:stop]:
            x = blk(x, modality, n_text, key_mask)
        return self.norm(x) if norm else x

    # ---------------------------------------------------------------- dual encoder

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, d), unit norm
        return F.normalize(self.itc_image(self.run(self.embed_image(images), "image")[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x, mask = self.embed_text(input_ids, attention_mask)
        return F.normalize(self.itc_text(self.run(x, "text", key_mask=mask)[:, 0]), dim=-1)

    def encode_pair(self, x: torch.Tensor, modality: str, key_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded unimodal input (B, L, d) -> (ITC feature, VL-head feature or None), unit norm.
        The lower blocks run once; the top blocks (vlffn_start..) run twice: through the
        modality's expert (the dual encoder) and through the VL expert (the VL contrastive head)."""
        c = self.cfg
        proj, vl_proj = (self.itc_image, "itc_vl_image") if modality == "image" else (self.itc_text, "itc_vl_text")
        if c.vl_itc_weight == 0:
            return F.normalize(proj(self.run(x, modality, key_mask=key_mask)[:, 0]), dim=-1), None
        low = self.run(x, modality, key_mask=key_mask, stop=c.vlffn_start, norm=False)
        top = self.run(low, modality, key_mask=key_mask, start=c.vlffn_start)[:, 0]
        vl = self.run(low, "vl", key_mask=key_mask, start=c.vlffn_start)[:, 0]
        return F.normalize(proj(top), dim=-1), F.normalize(getattr(self, vl_proj)(vl), dim=-1)

    # ---------------------------------------------------------------- fusion encoder

    def fuse(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T + 1 + N, d): the jointly encoded [text CLS, text, image CLS, patches]."""
        t, t_mask = self.embed_text(input_ids, attention_mask)
        i = self.embed_image(images)
        mask = torch.cat([t_mask, t_mask.new_ones(i.shape[:2])], dim=1)
        return self.run(torch.cat([t, i], dim=1), "vl", n_text=t.shape[1], key_mask=mask)

    def pooled(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, d): tanh(Linear) of the fused [T_CLS] (VLMo's pooler, shared by ITM, VQA, NLVR2)."""
        return torch.tanh(self.itm_pooler(self.fuse(images, input_ids, attention_mask)[:, 0]))

    def itm_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) match logits (column 1 = matched) from the fused text CLS token."""
        return self.itm_head(self.pooled(images, input_ids, attention_mask))

    def vqa_logits(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, vqa_answers) answer logits (model.vlmo.vqa_answers > 0)."""
        return self.vqa_head(self.pooled(images, input_ids, attention_mask))

    def nlvr2_logits(self, images_1: torch.Tensor, images_2: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits of one statement about two images (model.vlmo.nlvr2); both pairs fused
        in one pass of 2B rows."""
        pooled = self.pooled(torch.cat([images_1, images_2]), input_ids.repeat(2, 1), attention_mask.repeat(2, 1))
        return self.nlvr2_head(*pooled.chunk(2))

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.itm_logits(images, input_ids, attention_mask).float()
        return logits[:, 1] - logits[:, 0]  # (B,) log-odds of a match

    # ---------------------------------------------------------------- training objective

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_ids: torch.Tensor | None = None,
                vqa_scores: torch.Tensor | None = None, images_2: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of ``model.vlmo.stage``: mim takes images only, mlm captions only;
        vqa: BCE on the soft scores (B, answers); nlvr2: cross-entropy of the (B,) labels."""
        if self.cfg.stage == "vqa":
            return vqa_loss(self.vqa_logits(images, input_ids, attention_mask), vqa_scores)
        if self.cfg.stage == "nlvr2":
            return F.cross_entropy(self.nlvr2_logits(images, images_2, input_ids, attention_mask).float(), labels)
        if self.cfg.stage == "mim":
            return self.mim(images)[0]
        if self.cfg.stage == "mlm":
            return self.mlm_text(input_ids, attention_mask)[0]
        return self.vl_loss(images, input_ids, attention_mask, image_ids)

    def vl_loss(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ITC (+ VL head) + ITM + MLM over the global batch (gather.py; while training on
        several ranks with itc_gather). ``image_ids`` (B,), when the batch has them: captions of
        one image are positives of each other in ITC and never drawn as ITM negatives (nor are
        identical captions)."""
        c, loss, b = self.cfg, images.new_zeros(()), len(images)
        rank, world = gather.world() if (self.training and c.itc_gather) else (0, 1)
        grad_all = gather.gather_grad if world > 1 else (lambda t: t)
        scale = self.logit_scale.exp().clamp(max=100.0)
        ids_all = gather.gather_nograd(image_ids) if image_ids is not None and world > 1 else image_ids
        pos_ids = losses.positives_from_ids(ids_all) if ids_all is not None else None  # (B, B) global
        if c.contrastive_weight > 0 or c.itm_weight > 0 or c.vl_itc_weight > 0:
            t, t_mask = self.embed_text(input_ids, attention_mask)
            img, img_vl = self.encode_pair(self.embed_image(images), "image")
            txt, txt_vl = self.encode_pair(t, "text", t_mask)
            img_all, txt_all = grad_all(img), grad_all(txt)  # (B, d) global, this rank's rows keep grads
            if c.contrastive_weight > 0:
                loss = loss + c.contrastive_weight * gather.local_itc(img, txt, img_all, txt_all, scale, rank, pos_ids)
            if c.vl_itc_weight > 0:
                vl_scale = self.logit_vl_scale.exp().clamp(max=100.0)
                loss = loss + c.vl_itc_weight * gather.local_itc(img_vl, txt_vl, grad_all(img_vl), grad_all(txt_vl),
                                                                 vl_scale, rank, pos_ids)
        if c.itm_weight > 0:
            ids, mask = input_ids, attention_mask
            pix_all, tok_all, mask_all = images, ids, mask
            if world > 1:  # ranks' captions have other lengths: pad to the model's, then gather
                ids = gather.pad_to(input_ids, c.max_text_len, self.eos_token_id)
                mask = gather.pad_to(attention_mask, c.max_text_len, 0)
                pix_all, tok_all, mask_all = gather.gather_nograd(images), gather.gather_nograd(ids), \
                    gather.gather_nograd(mask)
            positives = same_caption(tok_all, mask_all)  # (B, B)
            if pos_ids is not None:
                positives = positives | pos_ids
            sim = scale.detach() * img_all.detach() @ txt_all.detach().T  # (B, B)
            neg_txt, neg_img = gather.global_hard_negatives(sim, positives, rank, b, world)
            logits = self.itm_logits(torch.cat([images, images, pix_all[neg_img]]),
                                     torch.cat([ids, tok_all[neg_txt], ids]),
                                     torch.cat([mask, mask_all[neg_txt], mask]))
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

    def mlm_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Stage mlm: (loss, masked-token accuracy) of text-only input (text expert in every block)."""
        masked, labels = losses.mask_tokens(input_ids, attention_mask, self.mask_token_id, self.vocab_size,
                                            [self.eos_token_id], self.cfg.mlm_prob)
        x, key_mask = self.embed_text(masked, attention_mask)
        logits = self.mlm_head(self.run(x, "text", key_mask=key_mask)[:, 1:])  # (B, T, vocab)
        return losses.mlm_loss(logits, labels), losses.mlm_accuracy(logits, labels)

    def mim(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
        """Stage mim (BEiT): (cross-entropy, accuracy) of the visual tokens of the block-masked
        patches, predicted from the image-only encoder's patch outputs."""
        c = self.cfg
        mask = pretrain.block_mask(len(images), c.image_size // c.patch_size, c.mim_mask_ratio, c.mim_min_block,
                                   generator).to(images.device)  # (B, N) bool
        targets = self.codebook(pretrain.patch_pixels(images, c.patch_size))[mask]  # (M,) visual-token ids
        h = self.run(self.embed_image(images, mask), "image")[:, 1:]  # (B, N, d) patch outputs
        logits = self.mim_head(h[mask]).float()  # (M, mim_vocab)
        return F.cross_entropy(logits, targets), float((logits.argmax(-1) == targets).float().mean())


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
