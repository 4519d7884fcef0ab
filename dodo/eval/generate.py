"""Caption generation for a MAGMA-style prefix LM: greedy, beam search, and temperature /
top-k / top-p sampling, with a KV cache (and the same decoders without it, recomputing the
whole sequence each step: the naive twin the cached path is tested against).

Written against the model's public attributes only (duck typing; the module is never
imported): ``model.embed(images, input_ids) -> (B, P + T, d)`` (image prefix + text
embeddings, which also sets FiLM's condition and the MoE routers' token ids),
``model.lm`` (a Hugging Face causal LM taking ``inputs_embeds`` and a KV cache),
``model.embed_image(images) -> (B, P, d)`` and ``model.embed_tokens(ids) -> (B, T, d)``
(interleaved prompts), ``model.moe`` (None or its ``set_tokens``) and ``model.eos_token_id``.

Why our own loop and not ``lm.generate``: the prompt starts with image embeddings, the
MoE hash / modality routers must see the token ids of each new step, and beam search
must carry the image prefix per beam; HF's generate handles none of these three for a
prefix built outside the LM. The steps are the textbook ones (HF's logits processors).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F


@dataclass
class Decoding:
    method: str = "greedy"  # greedy | beam | sample
    max_tokens: int = 16
    beams: int = 3
    length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0  # sampling
    use_cache: bool = True


class _Stepper:
    """Feeds one token per step and returns the next-token logits (B, V); ``use_cache`` keeps
    the LM's past keys / values, otherwise the whole sequence is recomputed each step."""

    def __init__(self, model: Any, embeds: torch.Tensor, use_cache: bool, prompt_ids: torch.Tensor | None = None):
        self.model, self.use_cache = model, use_cache
        self.embeds = embeds  # (B, L, d) the prompt, then every token fed so far (no cache)
        # Token ids for the MoE routers without cache: the prompt's text ids (B, T), then one
        # (B,) per step; the first L - T positions are the image prefix.
        if prompt_ids is None:
            prompt_ids = torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
        self.token_ids: list[torch.Tensor] = list(prompt_ids.T)
        self.n_image = embeds.shape[1] - prompt_ids.shape[1]
        # transformers 5 renamed past_key_values to `cache` (the old name warns, then goes).
        self.cache_arg = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"
        out = model.lm(inputs_embeds=embeds, use_cache=use_cache)
        self.past = self._past(out) if use_cache else None
        self.logits = out.logits[:, -1].float()  # (B, V)

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B,) -> logits (B, V) for the token after them."""
        emb = self.model.lm.get_input_embeddings()(ids[:, None]).to(self.embeds.dtype)  # (B, 1, d)
        moe = getattr(self.model, "moe", None)
        if self.use_cache:
            if moe is not None:  # the new token's id for hash / modality routing
                moe.set_tokens(ids[:, None], 0)
            out = self.model.lm(inputs_embeds=emb, use_cache=True, **{self.cache_arg: self.past})
            self.past = self._past(out)
        else:
            self.embeds = torch.cat([self.embeds, emb], dim=1)
            self.token_ids.append(ids)
            if moe is not None:  # the prompt's routing ids were set by model.embed; extend them
                moe.set_tokens(torch.stack(self.token_ids, 1), self.n_image)
            out = self.model.lm(inputs_embeds=self.embeds, use_cache=False)
        self.logits = out.logits[:, -1].float()
        return self.logits

    @staticmethod
    def _past(out: Any) -> Any:
        return out["cache"] if "cache" in out else out["past_key_values"]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search)."""
        self.logits = self.logits[index]
        if self.use_cache:
            self.past.reorder_cache(index)
        else:
            self.embeds = self.embeds[index]
            self.token_ids = [t[index] for t in self.token_ids]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering: removed entries become -inf. logits (B, V).
    Top-p keeps the smallest set of most likely tokens whose probability reaches p (the most
    likely token always stays)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def _finish(rows: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def decode(model: Any, embeds: torch.Tensor, cfg: Decoding, prompt_ids: torch.Tensor | None = None) -> list[list[int]]:
    """Token ids (EOS excluded) per prompt row of ``embeds`` (B, L, d); ``prompt_ids`` (B, T): the
    text ids at the end of the prompt (the MoE routers' ids when decoding without cache)."""
    eos = model.eos_token_id
    if cfg.method == "beam":
        return _beam(model, embeds, cfg, prompt_ids)
    step = _Stepper(model, embeds, cfg.use_cache, prompt_ids)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    ids = []
    logits = step.logits
    for _ in range(cfg.max_tokens):
        if cfg.method == "sample":
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(logits.device)
        else:  # greedy, and beam search of width 1
            nxt = logits.argmax(-1)
        nxt = nxt.masked_fill(done, eos)
        ids.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        logits = step.feed(nxt)
    return _finish(torch.stack(ids, 1), eos)


def _beam(model: Any, embeds: torch.Tensor, cfg: Decoding, prompt_ids: torch.Tensor | None = None) -> list[list[int]]:
    """Beam search: W beams per prompt; a beam ending in EOS is frozen (it extends only with
    EOS at no cost); the best by sum log p / length ** length_penalty is returned."""
    b, w, eos = embeds.shape[0], cfg.beams, model.eos_token_id
    step = _Stepper(model, embeds.repeat_interleave(w, 0), cfg.use_cache,  # rows: prompt-major
                    None if prompt_ids is None else prompt_ids.repeat_interleave(w, 0))
    scores = torch.full((b, w), float("-inf"), device=embeds.device)
    scores[:, 0] = 0.0  # identical beams at the start: only one may expand
    tokens = torch.zeros(b * w, 0, dtype=torch.long, device=embeds.device)
    lengths = torch.zeros(b * w, device=embeds.device)
    done = torch.zeros(b * w, dtype=torch.bool, device=embeds.device)
    logits = step.logits
    for t in range(cfg.max_tokens):
        logp = logits.log_softmax(-1)  # (B*W, V)
        frozen = torch.full_like(logp, float("-inf"))
        frozen[:, eos] = 0.0
        logp = torch.where(done[:, None], frozen, logp)
        v = logp.shape[-1]
        total = (scores.reshape(-1, 1) + logp).reshape(b, w * v)
        scores, flat = total.topk(w, dim=1)  # (B, W)
        src = (flat // v + torch.arange(b, device=flat.device)[:, None] * w).reshape(-1)  # (B*W,)
        nxt = (flat % v).reshape(-1)
        tokens = torch.cat([tokens[src], nxt[:, None]], dim=1)
        was_done = done[src]
        lengths = lengths[src] + (~was_done).float()
        done = was_done | (nxt == eos)
        step.reorder(src)
        if bool(done.all()) or t == cfg.max_tokens - 1:
            break
        logits = step.feed(nxt)
    norm = scores.reshape(-1) / lengths.clamp_min(1) ** cfg.length_penalty
    best = norm.reshape(b, w).argmax(1) + torch.arange(b, device=norm.device) * w
    return _finish(tokens[best], eos)


def embed_interleaved(model: Any, parts: Sequence[Any], tokenizer: Any, return_ids: bool = False) -> Any:
    """A few-shot prompt (image, text, image, text, image) -> (1, L, d) embeddings: each image
    as its image prefix (``model.embed_image``), each text as its token embeddings
    (``model.embed_tokens``), in order (MAGMA's interleaved input). ``parts``: (3, H, W) float
    image tensors (normalised as in training) and strings. FiLM (when used) is conditioned on
    the LAST image (embed_image sets it, the last call wins); MoE routers see -1 for image
    positions and the token ids elsewhere. ``return_ids``: also the (1, L) ids (-1 at image
    positions), decode's ``prompt_ids`` for the MoE routers when decoding without cache."""
    device = next(model.parameters()).device
    pieces, ids = [], []
    dtype = None  # the image prefix's dtype (the LM's compute dtype); text embeddings follow it
    for part in parts:
        if isinstance(part, str):
            tok = torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=torch.long, device=device)
            pieces.append(model.embed_tokens(tok[None]))  # (1, T, d)
            ids.append(tok)
        else:
            prefix = model.embed_image(part[None].to(device))  # (1, P, d)
            pieces.append(prefix)
            ids.append(torch.full((prefix.shape[1],), -1, dtype=torch.long, device=device))
            dtype = dtype or prefix.dtype
    if dtype is None:
        raise ValueError("an interleaved prompt needs at least one image")
    all_ids = torch.cat(ids)[None]  # (1, L)
    if getattr(model, "moe", None) is not None:
        model.moe.set_tokens(all_ids, 0)
    embeds = torch.cat([p.to(dtype) for p in pieces], dim=1)  # (1, L, d)
    return (embeds, all_ids) if return_ids else embeds


@torch.no_grad()
def generate_captions(model: Any, images: torch.Tensor, tokenizer: Any, cfg: Decoding,
                      prompt: str = "") -> list[str]:
    """images (B, 3, H, W) float, normalised as in training; ``prompt`` text follows the image."""
    device = images.device
    ids = tokenizer([prompt] * len(images), add_special_tokens=False)["input_ids"] if prompt else [[]] * len(images)
    input_ids = torch.tensor(ids, dtype=torch.long, device=device).reshape(len(images), -1)
    embeds = model.embed(images, input_ids)  # (B, P + T, d)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in decode(model, embeds, cfg, input_ids)]
