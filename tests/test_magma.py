"""The MAGMA-style model: adapter placements, loss masking, freezing, local weights, LM families."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dodo.adapters.bottleneck import AdaptedSublayer
from dodo.adapters.config import AdapterConfig
from dodo.data.collate import CaptionCollator
from dodo.data.synthetic import SyntheticShapes
from dodo.data.tokenizer import load_tokenizer
from dodo.models import build_model
from dodo.models.magma import ImageEncoderConfig, LMConfig, MagmaModelConfig

TOKENIZER = load_tokenizer("builtin:synthetic")


def tiny(**lm) -> MagmaModelConfig:
    return MagmaModelConfig(lm=LMConfig(d_model=32, n_head=2, n_positions=40, **lm),
                       image_encoder=ImageEncoderConfig(hidden=32, n_layer=1, n_head=2))


def build(cfg: MagmaModelConfig) -> nn.Module:
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=len(TOKENIZER), eos_token_id=TOKENIZER.eos_token_id)


def batch(n: int = 4) -> dict:
    data = SyntheticShapes("train", 16, 32, seed=0)
    return CaptionCollator(TOKENIZER, 16)([data[i] for i in range(n)])


@pytest.mark.parametrize("placement", ["sequential", "parallel", "scaled_parallel"])
def test_adapter_placements_follow_their_equations(placement):
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    wrapped = AdaptedSublayer(base, 8, AdapterConfig(placement=placement, init_std=0.1))
    if wrapped.scale is not None:
        with torch.no_grad():
            wrapped.scale.fill_(0.7)
    x = torch.randn(3, 5, 8)
    a = wrapped.adapter
    adapter = lambda h: a.up(torch.relu(a.down(h)))  # noqa: E731 - the equation, spelled out
    want = {"sequential": base(x) + adapter(base(x)), "parallel": base(x) + adapter(x),
            "scaled_parallel": base(x) + 0.7 * adapter(x)}[placement]
    torch.testing.assert_close(wrapped(x), want)


def test_adapter_keeps_tuple_outputs_of_attention():
    class Attn(nn.Module):
        def forward(self, h):
            return h * 2, "weights"

    out = AdaptedSublayer(Attn(), 4, AdapterConfig(init_std=0.1))(torch.ones(1, 2, 4))
    assert isinstance(out, tuple) and out[1] == "weights" and out[0].shape == (1, 2, 4)


def test_adapter_init_is_small_and_clamped():
    a = AdaptedSublayer(nn.Identity(), 64, AdapterConfig(init_std=1e-3)).adapter
    for w in (a.down.weight, a.up.weight):
        assert w.abs().max() <= 2e-3 and w.std() > 1e-4
    assert not a.down.bias.any() and not a.up.bias.any()


def test_loss_ignores_image_positions_and_padding():
    model = build(tiny()).eval()
    b = batch()
    b["attention_mask"][0, 3:] = 0  # pretend caption 0 is short: its tail is padding
    loss = model(b["images"], b["input_ids"], b["attention_mask"])
    embeds = model.embed(b["images"], b["input_ids"])
    n_prefix = embeds.shape[1] - b["input_ids"].shape[1]
    mask = torch.cat([torch.ones(4, n_prefix, dtype=torch.long), b["attention_mask"]], 1)
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits
    terms = [F.cross_entropy(logits[i, n_prefix - 1 + t], b["input_ids"][i, t], reduction="sum")
             for i in range(4) for t in range(b["input_ids"].shape[1]) if b["attention_mask"][i, t]]
    torch.testing.assert_close(loss, torch.stack(terms).sum() / len(terms))


def test_only_adapters_and_projection_train_and_base_stays_unchanged():
    model = build(tiny())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("prefix.") for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        b = batch()
        model(b["images"], b["input_ids"], b["attention_mask"]).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(not torch.equal(p, trained_before[n]) for n, p in model.named_parameters() if n in trained_before)


def test_trainable_image_encoder_option():
    cfg = tiny()
    cfg = dataclasses.replace(cfg, image_encoder=dataclasses.replace(cfg.image_encoder, trainable=True))
    model = build(cfg)
    assert all(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if ".adapter." not in n)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo", "gptj"])
def test_lm_families_build_adapt_and_train(arch):
    model = build(tiny(arch=arch, rotary_dim=8))
    assert len(model.adapted_modules) == 2  # mlp of each of the 2 layers
    b = batch()
    loss = model(b["images"], b["input_ids"], b["attention_mask"])
    loss.backward()
    assert torch.isfinite(loss)


def test_pretrained_weights_load_from_local_paths(tmp_path):
    from dodo.models.magma.model import ImageEncoder, build_lm

    cfg = tiny()
    torch.manual_seed(0)
    lm, encoder = build_lm(cfg.lm, len(TOKENIZER), TOKENIZER.eos_token_id), ImageEncoder(cfg.image_encoder)
    lm.save_pretrained(tmp_path / "lm")
    encoder.net.save_pretrained(tmp_path / "vit")
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, path=str(tmp_path / "lm")),
                              image_encoder=dataclasses.replace(cfg.image_encoder, path=str(tmp_path / "vit")))
    torch.manual_seed(123)  # a different seed: the weights must come from disk, not from init
    loaded = build_model(cfg, vocab_size=len(TOKENIZER), eos_token_id=TOKENIZER.eos_token_id)
    saved = dict(lm.named_parameters())
    for name, p in loaded.lm.named_parameters():
        if ".adapter." not in name:  # adapters wrap sub-layers: their base is under `.base.`
            assert torch.equal(p, saved[name.replace(".base.", ".")]), name
    for p, q in zip(encoder.parameters(), loaded.image_encoder.parameters()):
        assert torch.equal(p, q)


def test_missing_local_path_is_a_clear_error(tmp_path):
    cfg = tiny()
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, path=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="model.lm.path"):
        build(cfg)


def test_generate_returns_tokens_before_eos():
    model = build(tiny()).eval()
    out = model.generate(batch(2)["images"], max_tokens=5)
    assert len(out) == 2 and all(len(ids) <= 5 and TOKENIZER.eos_token_id not in ids for ids in out)
