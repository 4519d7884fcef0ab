"""VLMo multiway transformer: routing of every token to its modality's FFN expert (checked by
hooks on the experts), shared attention, LayerScale, dual-encoder vs fusion outputs."""

from __future__ import annotations

import pytest
import torch

from dodo.adapters.config import AdapterConfig
from conftest import REPO
from dodo.config.errors import ConfigError, ConfigValueError
from dodo.config.loader import load_job
from dodo.models import build_model
from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig
from dodo.models.vlmo.model import VlmoModel

D, LAYERS, START, VOCAB = 32, 4, 2, 50
B, T, N = 3, 7, 16  # batch, caption tokens, image patches (32 px / 8 px)


def model(**kw) -> VlmoModel:
    torch.manual_seed(0)
    adapter = kw.pop("adapter", AdapterConfig(kind="none"))
    cfg = VlmoModelConfig(adapter=adapter,
                          vlmo=VlmoConfig(hidden=D, layers=LAYERS, heads=4, vlffn_start=START, **kw))
    return build_model(cfg, vocab_size=VOCAB, eos_token_id=1, mask_token_id=2).eval()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.randn(B, 3, 32, 32, generator=g), ids, mask


class Tracer:
    """Records, per block, the hidden state after the attention residual and every expert's input."""

    def __init__(self, m: VlmoModel):
        self.mid: dict[int, torch.Tensor] = {}
        self.calls: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(m.blocks))}
        self.handles = []
        for i, blk in enumerate(m.blocks):
            self.handles.append(blk.register_forward_pre_hook(self._block_in(i)))
            self.handles.append(blk.attn.register_forward_hook(self._attn_out(i, blk)))
            for name, expert in blk.experts.items():
                self.handles.append(expert.register_forward_hook(self._expert(i, name)))

    def _block_in(self, i):
        def hook(_mod, args):
            self._x = args[0]
        return hook

    def _attn_out(self, i, blk):
        def hook(_mod, _args, out):
            self.mid[i] = self._x + blk.gamma_1 * out
        return hook

    def _expert(self, i, name):
        def hook(_mod, args, _out):
            assert name not in self.calls[i], f"expert {name} of block {i} ran twice"
            self.calls[i][name] = args[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_blocks_hold_the_right_experts_and_layerscale():
    m = model()
    for i, blk in enumerate(m.blocks):
        assert set(blk.experts) == ({"image", "text", "vl"} if i >= START else {"image", "text"})
        for e in blk.experts.values():  # per-modality LayerNorm + FFN
            assert isinstance(e.norm, torch.nn.LayerNorm) and e.fc1.out_features == 4 * D
        assert torch.equal(blk.gamma_1, torch.full((D,), 0.1)) and torch.equal(blk.gamma_2, torch.full((D,), 0.1))


@pytest.mark.parametrize("modality", ["image", "text"])
def test_unimodal_input_goes_to_its_own_expert_in_every_block(modality):
    m = model()
    images, ids, mask = inputs()
    tr = Tracer(m)
    with torch.no_grad():
        m.encode_image(images) if modality == "image" else m.encode_text(ids, mask)
    tr.close()
    length = 1 + N if modality == "image" else 1 + T
    for i in range(LAYERS):  # also above vlffn_start: the dual encoder never uses the VL expert
        assert list(tr.calls[i]) == [modality], (i, list(tr.calls[i]))
        x = tr.calls[i][modality]
        assert x.shape == (B, length, D)
        torch.testing.assert_close(x, tr.mid[i], rtol=0, atol=0)  # every token, unchanged


def test_image_text_input_routes_by_modality_below_and_to_vl_from_vlffn_start():
    m = model()
    images, ids, mask = inputs()
    tr = Tracer(m)
    with torch.no_grad():
        fused = m.fuse(images, ids, mask)
    tr.close()
    assert fused.shape == (B, 1 + T + 1 + N, D)
    for i in range(LAYERS):
        mid = tr.mid[i]  # [text CLS, T text tokens, image CLS, N patches]
        if i < START:
            assert sorted(tr.calls[i]) == ["image", "text"], (i, list(tr.calls[i]))
            torch.testing.assert_close(tr.calls[i]["text"], mid[:, : 1 + T], rtol=0, atol=0)
            torch.testing.assert_close(tr.calls[i]["image"], mid[:, 1 + T:], rtol=0, atol=0)
        else:
            assert list(tr.calls[i]) == ["vl"], (i, list(tr.calls[i]))
            torch.testing.assert_close(tr.calls[i]["vl"], mid, rtol=0, atol=0)


def test_routing_decides_the_output_only_through_the_chosen_expert():
    """Perturbing an expert changes exactly the outputs of the inputs routed to it."""
    m = model()
    images, ids, mask = inputs()
    with torch.no_grad():
        before = (m.encode_image(images), m.encode_text(ids, mask), m.fuse(images, ids, mask))
        m.blocks[START].experts["vl"].fc2.bias.add_(torch.randn(D))  # the VL expert of a top block
        after = (m.encode_image(images), m.encode_text(ids, mask), m.fuse(images, ids, mask))
        torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
        torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
        assert not torch.allclose(after[2], before[2])
        m.blocks[0].experts["text"].fc2.bias.add_(torch.randn(D))  # a lower block's text expert
        again = (m.encode_image(images), m.encode_text(ids, mask))
        torch.testing.assert_close(again[0], before[0], rtol=0, atol=0)
        assert not torch.allclose(again[1], before[1])


def test_attention_is_shared_by_the_modalities():
    m = model()
    images, ids, mask = inputs()
    for blk in m.blocks:  # one attention per block, no per-modality copy
        assert [n for n, _ in blk.named_children() if "attn" in n] == ["attn"]
    grads = {}
    for name, fn in (("image", lambda: m.encode_image(images)), ("text", lambda: m.encode_text(ids, mask)),
                     ("vl", lambda: m.itm_logits(images, ids, mask))):
        m.zero_grad()
        fn().sum().backward()
        grads[name] = [blk.attn.q_proj.weight.grad.clone() for blk in m.blocks]
    for name in grads:  # the same parameters learn from every modality
        assert all(g.abs().sum() > 0 for g in grads[name]), name


def test_dual_encoder_and_fusion_outputs():
    m = model()
    images, ids, mask = inputs()
    with torch.no_grad():
        img, txt = m.encode_image(images), m.encode_text(ids, mask)
        assert img.shape == txt.shape == (B, D)
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(B))
        torch.testing.assert_close(txt.norm(dim=-1), torch.ones(B))
        # padding is masked: extra pad columns change nothing
        pad_ids = torch.cat([ids, torch.ones(B, 3, dtype=torch.long)], 1)
        pad_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.long)], 1)
        torch.testing.assert_close(m.encode_text(pad_ids, pad_mask), txt, rtol=1e-5, atol=1e-6)
        logits = m.itm_logits(images, ids, mask)
        assert logits.shape == (B, 2) and m.itm_score(images, ids, mask).shape == (B,)
        # the fusion encoder's text CLS sees the image; the dual encoder's does not
        other = m.itm_logits(images.flip(0), ids, mask)
        assert not torch.allclose(other, logits)


def test_training_loss_reaches_every_expert_and_head():
    m = model(mlm_weight=1.0).train()
    images, ids, mask = inputs()
    ids[1] = ids[2]  # a repeated caption: a positive, never drawn as a hard negative
    mask[1] = mask[2]
    loss = m(images, ids, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.vlmo.vlffn_start"):
        load_job(REPO / "jobs/vlmo_retrieval.yaml", ["model.vlmo.vlffn_start=5"])
    with pytest.raises(ConfigValueError, match="loss weights are 0") as err:
        VlmoConfig(contrastive_weight=0, itm_weight=0, mlm_weight=0)
    assert err.value.key == "contrastive_weight"
    with pytest.raises(ValueError, match="max_text_len"):
        m = model(max_text_len=4)
        m.encode_text(*inputs()[1:])


def test_frozen_multiway_with_lora_adapters_trains_only_adapters_and_heads():
    m = model(frozen=True, adapter=AdapterConfig(kind="lora", locations=["attention", "mlp"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("itc_", "itm_", "logit_scale")) or ".lora_" in n or "lora" in n
                             for n in trainable), sorted(trainable)
    assert any("attn.q_proj" in n for n in trainable)  # LoRA on the shared attention
    with pytest.raises(ConfigValueError, match="model.family=vlmo does not take prefix adapters"):
        model(adapter=AdapterConfig(kind="prefix"))


def test_config_refuses_data_that_does_not_fit_the_model():
    with pytest.raises(ConfigError, match="data.image_size: is 64, but model.vlmo.image_size=32"):
        load_job(REPO / "jobs/vlmo_retrieval.yaml", ["data.image_size=64"])
    with pytest.raises(ConfigError, match="more than model.vlmo.max_text_len=8"):
        load_job(REPO / "jobs/vlmo_retrieval.yaml", ["model.vlmo.max_text_len=8"])


def test_image_ids_make_captions_of_one_image_positives():
    m = model()
    images, ids, mask = inputs()
    torch.manual_seed(1)
    plain = m(images, ids, mask)
    torch.manual_seed(1)
    assert torch.equal(m(images, ids, mask, image_ids=torch.arange(B)), plain)  # distinct ids: no change
    torch.manual_seed(1)
    shared = m(images, ids, mask, image_ids=torch.tensor([4, 4, 9]))  # captions 0 and 1: one image
    assert torch.isfinite(shared) and not torch.equal(shared, plain)
