"""uint8 batches normalised on the device: the same values, the same training step, as the float32
collate path; pre-tokenised captions used only when they are the run's tokenizer's."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from dodo.data.collate import CaptionCollator, for_training
from dodo.data.device import DeviceBatch, loader_options, to_device
from dodo.data.synthetic import SyntheticShapes
from dodo.data.tokenizer import load_tokenizer
from dodo.models import build_model
from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig as ModelConfig

TOKENIZER = load_tokenizer("builtin:synthetic")
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's


def samples(n: int = 6, size: int = 32):
    data = SyntheticShapes("train", 16, size, seed=3)
    return [data[i] for i in range(n)]


def test_device_normalise_equals_the_float_collator():
    items = samples()
    floats = CaptionCollator(TOKENIZER, 16, MEAN, STD)(items)
    u8 = CaptionCollator(TOKENIZER, 16, MEAN, STD, output="uint8")(items)
    assert u8["images"].dtype == torch.uint8 and u8["images"].shape == floats["images"].shape
    assert u8["images"].is_contiguous(memory_format=torch.channels_last)  # no host-side transpose
    moved = to_device(u8, "cpu", MEAN, STD)
    # Same formula and float32 constants on both sides: equal, not just close, on the CPU.
    assert torch.equal(moved["images"], floats["images"])
    assert torch.equal(moved["input_ids"], floats["input_ids"])
    assert set(moved) == {"images", "input_ids", "attention_mask", "image_ids"}  # host-only lists dropped
    half = DeviceBatch("cpu", MEAN, STD, torch.bfloat16)(u8)["images"]
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), floats["images"], atol=2e-2, rtol=1e-2)


def tiny_model() -> torch.nn.Module:
    cfg = ModelConfig(lm=LMConfig(d_model=32, n_head=2, n_positions=40),
                      image_encoder=ImageEncoderConfig(hidden=32, n_layer=1, n_head=2))
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=len(TOKENIZER), eos_token_id=TOKENIZER.eos_token_id)


def one_step(batches_to_model) -> list[float]:
    """Loss of a step, an AdamW update, and the loss of the next step (fixed init and data)."""
    model = tiny_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches_to_model:
        torch.manual_seed(1)  # dropout streams equal on both paths
        loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_step_loss_is_the_same_on_the_uint8_path():
    items = samples(8)
    old = CaptionCollator(TOKENIZER, 16)
    new = for_training(old)  # what the training loop uses
    assert new.output == "uint8" and old.output == "float32"
    move = DeviceBatch.for_collate(old, "cpu")
    plain = lambda b: {k: v for k, v in b.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    old_losses = one_step([plain(old(items[:4])), plain(old(items[4:]))])
    new_losses = one_step([move(new(items[:4])), move(new(items[4:]))])
    assert all(np.isfinite(old_losses))
    np.testing.assert_allclose(new_losses, old_losses, rtol=1e-6, atol=1e-7)


def test_stored_tokens_are_used_and_checked(caplog):
    items = samples(4)
    ids = TOKENIZER([s.caption for s in items], add_special_tokens=False)["input_ids"]
    stored = [dataclasses.replace(s, caption=s.caption) for s in items]
    for s, t in zip(stored, ids):
        object.__setattr__(s, "tokens", np.asarray(t, np.int32))
    collate = CaptionCollator(TOKENIZER, 5, use_stored_tokens=True)  # 5: truncation applies too
    out = collate(stored)
    ref = CaptionCollator(TOKENIZER, 5)(items)
    assert torch.equal(out["input_ids"], ref["input_ids"]) and collate.use_stored_tokens
    assert torch.equal(out["attention_mask"], ref["attention_mask"])

    # Tokens from another tokenizer: one warning, then captions are tokenised from text.
    for s in stored:
        object.__setattr__(s, "tokens", (np.asarray(s.tokens) + 1).astype(np.int32))
    collate = CaptionCollator(TOKENIZER, 16, use_stored_tokens=True)
    with caplog.at_level(logging.WARNING, logger="dodo.data"):
        out = collate(stored)
        collate(stored)
    assert torch.equal(out["input_ids"], CaptionCollator(TOKENIZER, 16)(items)["input_ids"])
    assert not collate.use_stored_tokens
    assert sum("pre-tokenised" in r.message for r in caplog.records) == 1


class _Cache:  # a dataset whose manifest records the tokenizer that tokenised it
    def __init__(self, tokenizer: dict):
        self.manifest = type("M", (), {"tokenizer": tokenizer})()


def test_for_training_trusts_only_a_matching_tokenizer():
    base = CaptionCollator(TOKENIZER, 16)
    assert for_training(base, _Cache({"name_or_path": "x", "vocab_size": len(TOKENIZER)})).use_stored_tokens
    assert not for_training(base, _Cache({"vocab_size": len(TOKENIZER) + 7})).use_stored_tokens
    assert not for_training(base, _Cache({})).use_stored_tokens
    assert not for_training(base, object()).use_stored_tokens
    other = lambda b: b  # noqa: E731  (a task's own collate function is left alone)
    assert for_training(other) is other


def test_loader_options():
    assert loader_options(torch.device("cpu"), 0, 4) == {"pin_memory": False}
    assert loader_options(torch.device("cuda"), 2, 4) == {"pin_memory": True, "persistent_workers": True,
                                                          "prefetch_factor": 4}


def test_frozen_lm_uses_torchs_fused_gelu_with_the_same_outputs():
    from transformers import AutoModelForCausalLM

    from dodo.models.magma.config import LMConfig
    from dodo.models.magma.model import build_lm

    for arch in ("gpt2", "gptj"):
        torch.manual_seed(0)
        lm = build_lm(LMConfig(arch=arch, d_model=32, n_head=2, n_layer=2, n_positions=40, rotary_dim=8),
                      vocab_size=50, eos_token_id=0).eval()
        assert lm.config.activation_function == "gelu_pytorch_tanh"
        assert any(type(m).__name__ == "GELUTanh" for m in lm.modules())
        slow_cfg = lm.config.__class__(**{**lm.config.to_dict(), "activation_function": "gelu_new"})
        slow = AutoModelForCausalLM.from_config(slow_cfg).eval()
        slow.load_state_dict(lm.state_dict())
        assert any(type(m).__name__ == "NewGELUActivation" for m in slow.modules())
        ids = torch.randint(0, 50, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(lm(ids).logits, slow(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_cache_with_stored_tokens_feeds_them_to_training(tmp_path):
    from dodo.data.cache import CacheOptions, build_cache
    from dodo.data.dataset import CachedDataset

    build_cache(CacheOptions(source="synthetic", src="train", out=str(tmp_path / "c"), store="hdf5", encode="raw",
                             image_size=16, samples_per_shard=8, workers=1, num=12, seed=0,
                             tokenizer="builtin:synthetic"), log=lambda m: None)
    ds = CachedDataset(tmp_path / "c", "none")
    items = [ds[i] for i in range(6)]
    assert all(s.tokens is not None for s in items)
    collate = for_training(CaptionCollator(TOKENIZER, 16), ds)
    assert collate.use_stored_tokens and collate.output == "uint8"
    out, ref = collate(items), CaptionCollator(TOKENIZER, 16)(items)
    assert torch.equal(out["input_ids"], ref["input_ids"]) and collate.use_stored_tokens
    assert torch.equal(DeviceBatch.for_collate(collate, "cpu")(out)["images"], ref["images"])
