"""BLEU-4 / CIDEr-D against pycocoevalcap run directly, and generation: greedy with a KV cache
equals greedy recomputing the whole sequence, beam width 1 equals greedy, seeded sampling is
deterministic and top-k = 1 is greedy, on a tiny random MAGMA-style prefix LM."""

from __future__ import annotations

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from dodo.eval.caption_metrics import score_captions, tokenize
from dodo.eval.generate import Decoding, decode, embed_interleaved, filter_logits

REFS = {
    "1": ["A man riding a bike on a city street.", "A cyclist rides past parked cars.",
          "A person on a bicycle in traffic.", "A man pedals down the road.", "Someone cycling downtown."],
    "2": ["Two dogs playing in the snow.", "A pair of puppies run through snow.", "Dogs chase each other outside.",
          "Two brown dogs in a snowy yard.", "Playful dogs in winter."],
    "3": ["A bowl of fruit on a wooden table.", "Apples and bananas in a bowl.", "Fresh fruit on the kitchen table.",
          "A fruit bowl with oranges.", "A still life of fruit."],
}
PREDS = {"1": "a man riding a bicycle down a city street", "2": "two dogs playing in the snow",
         "3": "a bowl of apples on a table"}


def test_tokenize_like_ptb():
    assert tokenize("A man, riding a bike.") == "a man riding a bike"
    assert tokenize("Dogs' toys -- don't!") == "dogs toys don't"


def test_scores_equal_pycocoevalcap_run_directly():
    got = score_captions(REFS, PREDS)
    gts = {k: [tokenize(r) for r in v] for k, v in REFS.items()}
    res = {k: [tokenize(v)] for k, v in PREDS.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert got["bleu4"] == bleu[3] and got["cider"] == cider
    assert 0 < got["bleu4"] < 1 and got["cider"] > 0.5
    # Against every reference: a prediction equal to a reference other than the first scores well.
    assert score_captions(REFS, {k: v[3] for k, v in REFS.items()})["cider"] > got["cider"]
    with pytest.raises(ValueError, match="different images"):
        score_captions(REFS, {"1": "a man"})


class Patches(nn.Module):
    """(B, 3, H, W) -> (B, P, 8) patch features, like MagmaModel's ImageEncoder."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


class TinyPrefixLM(nn.Module):
    """The attributes dodo.eval.generate relies on, as MagmaModel has them: an image encoder
    giving (B, P, enc) patch features, a prefix projection, an HF causal LM, eos_token_id."""

    def __init__(self, vocab: int = 23, d: int = 16, eos: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.eos_token_id = eos
        self.moe = None
        self.film_condition = None
        self.image_encoder = Patches()
        self.prefix = nn.Linear(8, d)
        self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=d, n_layer=2, n_head=2,
                                             resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, initializer_range=0.5,
                                             bos_token_id=eos, eos_token_id=eos, pad_token_id=eos))
        self.eval()

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.prefix(self.image_encoder(images))  # (B, P, d)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)  # (B, T, d)

    def embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed_image(images), self.embed_tokens(input_ids)], dim=1)


@pytest.fixture(scope="module")
def model_and_prompt():
    model = TinyPrefixLM()
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, model.embed(images, torch.zeros(3, 0, dtype=torch.long)).detach()


def naive_greedy(model, embeds: torch.Tensor, steps: int) -> list[list[int]]:
    """The plainest greedy decoder: the whole sequence through the LM every step, per row."""
    out = []
    for row in embeds:
        seq, ids = row[None], []
        for _ in range(steps):
            nxt = int(model.lm(inputs_embeds=seq).logits[0, -1].argmax())
            if nxt == model.eos_token_id:
                break
            ids.append(nxt)
            seq = torch.cat([seq, model.lm.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
        out.append(ids)
    return out


def test_greedy_kv_cache_equals_recompute(model_and_prompt):
    model, emb = model_and_prompt
    cached = decode(model, emb, Decoding("greedy", max_tokens=12, use_cache=True))
    plain = decode(model, emb, Decoding("greedy", max_tokens=12, use_cache=False))
    assert cached == plain == naive_greedy(model, emb, 12)
    assert any(len(c) > 3 for c in cached)  # it generated something, not an immediate EOS


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_width_1_is_greedy_and_wider_beams_score_no_worse(model_and_prompt, use_cache):
    model, emb = model_and_prompt
    greedy = decode(model, emb, Decoding("greedy", max_tokens=7))
    assert decode(model, emb, Decoding("beam", beams=1, max_tokens=7, use_cache=use_cache)) == greedy
    beam = decode(model, emb, Decoding("beam", beams=4, max_tokens=7, length_penalty=0.0, use_cache=use_cache))

    @torch.no_grad()
    def logp(row: torch.Tensor, ids: list[int]) -> float:  # sum log p of ids (+ EOS if it ended)
        seq, total = row[None], 0.0
        for t in ids + ([model.eos_token_id] if len(ids) < 7 else []):
            total += float(model.lm(inputs_embeds=seq).logits[0, -1].log_softmax(-1)[t])
            seq = torch.cat([seq, model.lm.get_input_embeddings()(torch.tensor([[t]]))], dim=1)
        return total
    for row, g, b in zip(emb, greedy, beam):
        assert logp(row, b) >= logp(row, g) - 1e-5


def test_sampling_is_seeded_and_top_k_1_is_greedy(model_and_prompt):
    model, emb = model_and_prompt
    cfg = Decoding("sample", max_tokens=7, temperature=1.5, top_p=0.9, seed=7)
    a, b = decode(model, emb, cfg), decode(model, emb, cfg)
    assert a == b
    assert decode(model, emb, Decoding("sample", max_tokens=7, seed=8, temperature=1.5)) != a
    assert decode(model, emb, Decoding("sample", max_tokens=7, top_k=1, seed=3)) == \
        decode(model, emb, Decoding("greedy", max_tokens=7))


def test_filter_logits_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all() and torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert torch.isfinite(filter_logits(logits, top_p=0.5))[0].tolist() == [True, False, False, False]


class WordTokenizer:
    def __init__(self):
        self.vocab = {w: i + 1 for i, w in enumerate("a photo of dog cat on grass".split())}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_interleaved_prompt_embeds_in_order(model_and_prompt):
    model, _ = model_and_prompt
    g = torch.Generator().manual_seed(2)
    im1, im2 = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    tok = WordTokenizer()
    emb = embed_interleaved(model, [im1, "a photo of dog", im2, "a photo of cat", im1], tok)
    p = model.image_encoder(im1[None]).shape[1]  # patches per image
    assert emb.shape == (1, 3 * p + 8, 16)
    torch.testing.assert_close(emb[:, :p], model.prefix(model.image_encoder(im1[None])))
    words = model.lm.get_input_embeddings()(torch.tensor([[1, 2, 3, 5]]))
    torch.testing.assert_close(emb[:, 2 * p + 4:2 * p + 8], words)
    assert len(decode(model, emb, Decoding("greedy", max_tokens=5))) == 1


def test_on_the_magma_model_cached_greedy_equals_its_own_generate():
    """The real MAGMA-style model (random, with bottleneck adapters): its own greedy generate
    (recomputing the sequence) and our KV-cached greedy agree token for token."""
    from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig
    from dodo.models.magma.model import MagmaModel

    torch.manual_seed(0)
    cfg = MagmaModelConfig(lm=LMConfig(d_model=32, n_head=2, n_layer=2, init_std=0.3),
                           image_encoder=ImageEncoderConfig(hidden=32, n_layer=1, n_head=2, image_size=16))
    model = MagmaModel(cfg, vocab_size=40, eos_token_id=0).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    want = model.generate(images, max_tokens=6)
    emb = model.embed(images, torch.zeros(2, 0, dtype=torch.long))
    assert decode(model, emb, Decoding("greedy", max_tokens=6)) == want
    assert decode(model, emb, Decoding("beam", beams=1, max_tokens=6)) == want
