"""Prompt learning on a frozen CLIP (transformers CLIPModel): CoOp and structured prompts.

Only the prompt vectors (and, for structured prompts, the visual-guided attention) train; both
towers, their projections and the temperature stay frozen. A prompt is a sequence of input
token embeddings of the text tower, assembled per class (T tokens, width D):

  CoOp, position end:    [V1 .. VM][name tokens][suffix "."][EOS]
          position front:  [name tokens][V1 .. VM][suffix][EOS]
          position middle: [V1 .. V(M/2)][name tokens][V(M/2+1) .. VM][suffix][EOS]
  structured (concat):   [G1 .. Gg][D_c,1 .. D_c,d][I_1(x) .. I_i(x)][name tokens][suffix][EOS]
  structured (add):      [G + I_G(x)][D_c + I_D(x)][name tokens][suffix][EOS]

V: one shared set (M, D) or class-specific (C, M, D, csc). G: general prompt (g, D), shared.
D_c: domain (class) prompt (C, d, D). I(x) = W_o MHA(Q, P(x), P(x)): i learnable queries Q (i,
d_v) attend over the image's patch tokens P(x) (the frozen vision tower's last layer after its
post-layernorm, (N, d_v)); W_o maps them to the text width D. Then CLIP's own path: + position
embeddings, the causal encoder, final layernorm, the EOS-position feature, the text projection.
No BOS is added, as dodo's collator adds none: with V = the embeddings of "a photo of a" the
features equal CLIP's text features of "a photo of a {class}." exactly (tested).

Classes the prompts were not trained on (the new classes of the base-to-new split) take the
mean of the class-specific prompts (CSC contexts, domain prompts) with their own names.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dodo.adapters.inject import freeze
from dodo.models.clip.model import build_clip
from dodo.models.prompt.config import PromptModelConfig


def build(cfg: PromptModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: int | None = None,
          init=None) -> nn.Module:
    """FamilySpec.model: prompt models need the tokenizer and the class names, which only the
    task has (dodo/models/prompt/task.py builds PromptCLIP itself)."""
    raise ValueError("a prompt-learning model is built by its task (dodo.models.prompt.task.PromptTask): "
                     "its prompts are sized by the class names of data.train_cache")


class PromptCLIP(nn.Module):
    def __init__(self, cfg: PromptModelConfig, tokenizer, classnames: Sequence[str]):
        """``classnames``: the classes the prompts are trained on (class-specific prompts are
        sized by them); ``tokenizer``: the run's (class names and the init phrase go through it)."""
        super().__init__()
        p = self.p = cfg.prompt
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.clip = build_clip(cfg, len(tokenizer), self.eos_id)
        freeze(self.clip)  # the whole CLIP, projections and temperature included
        # The temperature as shape (1,): DeepSpeed cannot broadcast CLIP's 0-dim parameter.
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1).clone(), requires_grad=False)
        self.width = self.clip.config.text_config.hidden_size  # D
        self.max_len = self.clip.config.text_config.max_position_embeddings
        self.classnames = list(classnames)
        n_cls = len(self.classnames)
        init_ids = self.ids(p.ctx_init) if p.ctx_init else []
        std = p.init_std
        if p.method == "coop":
            m = len(init_ids) or p.n_ctx  # CoOp: an init phrase sets the context length
            ctx = self.embed_ids(init_ids) if init_ids else torch.randn(m, self.width) * std  # (M, D)
            self.ctx = nn.Parameter(ctx.expand(n_cls, -1, -1).clone() if p.csc else ctx.clone())
        else:
            g = len(init_ids) or p.n_general
            gen = self.embed_ids(init_ids) if init_ids else torch.randn(g, self.width) * std
            self.general = nn.Parameter(gen.clone())  # (g, D)
            self.domain = nn.Parameter(torch.randn(n_cls, p.n_domain, self.width) * std)  # (C, d, D)
            d_v = self.clip.config.vision_config.hidden_size
            heads = math.gcd(p.instance_heads, d_v)  # a head count that divides the vision width
            self.queries = nn.Parameter(torch.randn(p.n_instance, d_v) * std)  # (i, d_v)
            self.instance_attn = nn.MultiheadAttention(d_v, heads, batch_first=True)
            self.instance_out = nn.Linear(d_v, self.width)
            nn.init.normal_(self.instance_out.weight, std=std)  # instance tokens start small, like V
            nn.init.zeros_(self.instance_out.bias)
        self.suffix_ids = self.ids(p.suffix) if p.suffix else []
        self.train_names = self.name_ids(self.classnames)  # token ids of the trained classes' names
        longest = max((len(self.ids(n)) for n in self.classnames), default=0)
        need = self.n_context + longest + len(self.suffix_ids) + 1
        if need > self.max_len:
            raise ValueError(f"prompts need {need} text positions ({self.n_context} context + {longest} name + "
                             f"suffix + EOS), more than model.clip.max_text_len={self.max_len}; shorten the "
                             "prompt (model.prompt.n_ctx / n_general / n_domain / n_instance) or raise max_text_len")

    # ------------------------------------------------------------------ tokens

    @property
    def n_context(self) -> int:
        if self.p.method == "coop":
            return self.ctx.shape[-2]
        extra = self.p.n_instance if self.p.instance_mode == "concat" else 0
        return self.general.shape[0] + self.domain.shape[1] + extra

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:  # (L,) -> (L, D), the frozen token embedding
        emb = self.clip.text_model.embeddings.token_embedding
        return emb(torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device)).detach()

    # ------------------------------------------------------------------ the text tower on embeddings

    def assemble(self, ctx: torch.Tensor, names: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ctx (N, M, D) and N name-token lists -> (embeddings (N, T, D), attention mask (N, T),
        EOS position (N,)): the class name placed as model.prompt.class_token_position says."""
        emb = self.clip.text_model.embeddings.token_embedding
        dev = emb.weight.device
        rows, lengths = [], []
        for k, name in enumerate(names):
            name_e = emb(torch.tensor(list(name), dtype=torch.long, device=dev))  # (L, D)
            tail = emb(torch.tensor(list(self.suffix_ids) + [self.eos_id], dtype=torch.long, device=dev))
            c = ctx[k]
            pos = self.p.class_token_position
            if pos == "end":
                parts = [c, name_e]
            elif pos == "front":
                parts = [name_e, c]
            else:  # middle: half the context, the name, the other half (CoOp's split)
                half = c.shape[0] // 2
                parts = [c[:half], name_e, c[half:]]
            rows.append(torch.cat([*parts, tail]))
            lengths.append(rows[-1].shape[0])
        t = max(lengths)
        pad = emb(torch.tensor([self.pad_id], device=dev))  # (1, D); positions after EOS are never attended to
        x = torch.stack([torch.cat([r, pad.expand(t - r.shape[0], -1)]) for r in rows])  # (N, T, D)
        lens = torch.tensor(lengths, device=dev)
        mask = (torch.arange(t, device=dev)[None, :] < lens[:, None]).long()  # (N, T)
        return x, mask, lens - 1

    def text_from_embeddings(self, x: torch.Tensor, mask: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
        """CLIPTextModel's forward from input embeddings (it takes ids only): (N, T, D) -> (N, P)."""
        from transformers.masking_utils import create_causal_mask

        tm = self.clip.text_model
        h = tm.embeddings(inputs_embeds=x)  # + position embeddings
        causal = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=mask, cache=None)
        h = tm.encoder(inputs_embeds=h, attention_mask=causal, is_causal=True).last_hidden_state
        h = tm.final_layer_norm(h)
        return self.clip.text_projection(h[torch.arange(h.shape[0], device=h.device), eos])  # (N, P)

    # ------------------------------------------------------------------ contexts

    def class_contexts(self, classes: Sequence[Optional[int]]) -> torch.Tensor:
        """CoOp: (N, M, D) context per entry (a trained class's index, or None: unified / mean)."""
        if not self.p.csc:
            return self.ctx.expand(len(classes), -1, -1)
        mean = self.ctx.mean(0)
        return torch.stack([self.ctx[c] if c is not None else mean for c in classes])

    def domain_prompts(self, classes: Sequence[Optional[int]]) -> torch.Tensor:  # (N, d, D)
        mean = self.domain.mean(0)
        return torch.stack([self.domain[c] if c is not None else mean for c in classes])

    def instance_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """Visual-guided attention: patch tokens (B, N, d_v) -> instance tokens (B, i, D)."""
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)  # (B, i, d_v)
        out, _ = self.instance_attn(q, patches, patches, need_weights=False)
        return self.instance_out(out)

    def structured_contexts(self, classes: Sequence[Optional[int]], inst: torch.Tensor) -> torch.Tensor:
        """inst (B, i, D) -> (B, C, M, D) contexts, [G][D_c][I] or [G; D_c] + I."""
        b, c = inst.shape[0], len(classes)
        gd = torch.cat([self.general.expand(c, -1, -1), self.domain_prompts(classes)], 1)  # (C, g + d, D)
        gd = gd.unsqueeze(0).expand(b, -1, -1, -1)
        inst = inst.unsqueeze(1).expand(-1, c, -1, -1)  # (B, C, i, D)
        return torch.cat([gd, inst], 2) if self.p.instance_mode == "concat" else gd + inst

    # ------------------------------------------------------------------ features and logits

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (unit-norm image features (B, P), patch tokens (B, N, d_v))."""
        vm = self.clip.vision_model
        h = vm(pixel_values=images).last_hidden_state  # (B, 1 + N, d_v)
        feats = self.clip.visual_projection(vm.post_layernorm(h[:, 0]))
        return F.normalize(feats, dim=-1), vm.post_layernorm(h[:, 1:])

    def name_ids(self, names: Sequence[str]) -> list[list[int]]:
        cache = self.__dict__.setdefault("_name_cache", {})  # name -> token ids (evals re-ask every batch)
        return [cache[n] if n in cache else cache.setdefault(n, self.ids(n)) for n in names]

    def logits(self, images: torch.Tensor, names: Sequence[Sequence[int]],
               classes: Sequence[Optional[int]]) -> torch.Tensor:
        """(B, C) scaled cosine logits of the images against the prompts of ``names`` (token
        lists); ``classes[k]``: name k's trained class index, or None (a new class)."""
        img, patches = self.image_features(images)
        scale = self.clip.logit_scale.exp()
        if self.p.method == "coop":
            txt = F.normalize(self.text_from_embeddings(*self.assemble(self.class_contexts(classes), names)), dim=-1)
            return scale * img @ txt.T
        ctx = self.structured_contexts(classes, self.instance_tokens(patches))  # (B, C, M, D)
        b, c = ctx.shape[:2]
        feats = self.text_from_embeddings(*self.assemble(ctx.flatten(0, 1), list(names) * b))
        txt = F.normalize(feats, dim=-1).view(b, c, -1)  # (B, C, P): one prompt per (image, class)
        return scale * torch.einsum("bp,bcp->bc", img, txt)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the trained classes; ``labels`` (B,) index ``self.classnames``."""
        names = self.train_names
        return F.cross_entropy(self.logits(images, names, list(range(len(names)))), labels)

    # ------------------------------------------------------------------ eval-suite hooks

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)[0]

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Each text is taken as a class name inside the learned prompt (unit norm, (N, P)); a
        trained class's name gets its own class-specific prompt, others the mean. Structured
        prompts have no image here: their instance tokens are zero."""
        classes = [self.classnames.index(t) if t in self.classnames else None for t in texts]
        names = self.name_ids(texts)
        if self.p.method == "coop":
            ctx = self.class_contexts(classes)
        else:
            zero = self.queries.new_zeros(1, self.p.n_instance, self.width)
            ctx = self.structured_contexts(classes, zero)[0]
        return F.normalize(self.text_from_embeddings(*self.assemble(ctx, names)), dim=-1)
