"""The MoE adapter layer inside the MAGMA model: placement, upcycling equality, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from dodo.config.errors import ConfigError
from dodo.config.loader import load_job
from dodo.moe.layer import MoEAdapter, moe_layers

SMALL = ["model.lm.d_model=32", "model.lm.n_head=2", "model.lm.n_positions=40",
         "model.image_encoder.hidden=32", "model.image_encoder.n_layer=1", "model.prefix_dropout=0.0"]
JOB = str(REPO / "jobs/demo.yaml")


def build(overrides: list[str]):
    from dodo.data.tokenizer import load_tokenizer
    from dodo.models import build_model

    cfg = load_job(JOB, SMALL + overrides)
    tok = load_tokenizer(cfg.model.tokenizer)
    torch.manual_seed(cfg.model.init_seed)
    from dodo.train.init_from import read_init  # model.moe.upcycle_from -> tensors, as the trainer does

    return build_model(cfg.model, vocab_size=len(tok), eos_token_id=tok.eos_token_id, init=read_init(cfg)), tok


def batch(tok, n: int = 6):
    from dodo.data.collate import CaptionCollator
    from dodo.data.synthetic import SyntheticShapes

    data = SyntheticShapes("eval", n, 32, 1234)
    return CaptionCollator(tok, 16)([data[i] for i in range(n)])


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model.lm(inputs_embeds=model.embed(b["images"], b["input_ids"])).logits


def test_moe_adapters_replace_dense_ones_where_configured():
    model, _ = build(["model.moe.num_experts=4", "model.moe.layers=[-1]",
                      "model.adapter.locations=[attention, mlp]"])
    layers = moe_layers(model)
    assert [(layer.layer_index, len(layer.local_experts)) for layer in layers] == [(1, 4), (1, 4)]
    assert type(model.lm.transformer.h[0].mlp.adapter).__name__ == "BottleneckAdapter"  # block 0 dense
    experts = [p for n, p in model.named_parameters() if ".deepspeed_experts." in n]
    assert experts and all(p.allreduce is False and p.group_name == "ep_size_1" for p in experts)
    assert all(not hasattr(p, "allreduce") for n, p in model.named_parameters() if ".gate." in n)


@pytest.mark.parametrize("router", ["topk", "hash", "expert_choice"])
def test_moe_model_trains_with_aux_loss_in_forward(router: str):
    model, tok = build(["model.moe.num_experts=4", f"model.moe.router={router}", "model.moe.aux_loss=1.0",
                        "model.moe.z_loss=1.0"])
    b = batch(tok)
    model.train()
    loss = model(b["images"], b["input_ids"], b["attention_mask"])
    model.eval()
    plain = model(b["images"], b["input_ids"], b["attention_mask"])  # eval: no aux loss
    if router != "hash":
        assert float(loss.detach()) > float(plain) + 1.0  # the z-loss alone is about log(4)^2 per layer
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".deepspeed_experts." in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    metrics = model.step_metrics()
    assert len(metrics["moe.load"]) == 4 and abs(sum(metrics["moe.load"]) - 1) < 1e-3
    assert 0.0 <= metrics["moe.dropped"] <= 1.0


def test_upcycled_model_equals_dense_model_at_init(tmp_path: Path):
    dense, tok = build([])
    with torch.no_grad():  # a "trained" dense adapter: far from its near-zero init
        for p in dense.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    state = {n: p.detach().clone() for n, p in dense.named_parameters() if p.requires_grad}
    torch.save({"dense_state": state}, tmp_path / "dense.pt")
    moe, _ = build(["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.dropless=true",
                    f"model.moe.upcycle_from={tmp_path / 'dense.pt'}"])
    dense.eval(), moe.eval()
    b = batch(tok)
    want, got = logits(dense, b), logits(moe, b)
    assert (want - got).abs().max() < 1e-5 * want.abs().max()
    args = (b["images"], b["input_ids"], b["attention_mask"])
    assert float(moe(*args)) == pytest.approx(float(dense(*args)), rel=1e-6)
    layer = moe_layers(moe)[0]
    first = list(layer.local_experts[0].parameters())
    assert all(torch.equal(a, b) for e in layer.local_experts[1:] for a, b in zip(first, e.parameters()))
    # With noise the experts differ (and no longer equal the dense model exactly).
    noisy, _ = build(["model.moe.num_experts=4", f"model.moe.upcycle_from={tmp_path / 'dense.pt'}",
                      "model.moe.upcycle_noise=0.01"])
    e0, e1 = moe_layers(noisy)[0].local_experts[:2]
    assert not torch.equal(e0.down.weight, e1.down.weight)


def test_upcycling_refuses_a_mismatched_checkpoint(tmp_path: Path):
    torch.save({"dense_state": {"prefix.0.weight": torch.zeros(3)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="upcycle from a run with the same"):
        build(["model.moe.num_experts=2", f"model.moe.upcycle_from={tmp_path / 'bad.pt'}"])


def test_lora_experts_start_as_zero_maps():
    model, tok = build(["model.moe.num_experts=2", "model.moe.expert=lora", "model.moe.top_k=1"])
    dense_like, _ = build(["model.adapter.kind=none"])
    b = batch(tok)
    model.eval(), dense_like.eval()
    assert torch.allclose(logits(model, b), logits(dense_like, b), atol=1e-6)  # B = 0: no change


@pytest.mark.parametrize("overrides, message", [
    (["model.moe.num_experts=6", "model.moe.ep_size=4"], "must divide model.moe.num_experts=6, got 4"),
    (["model.moe.num_experts=4", "model.moe.ep_size=4"], "must divide the world size 2, got 4"),
    (["model.moe.num_experts=4", "deepspeed.zero_stage=3"], "does not support MoE with ZeRO stage 3"),
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "must be <= model.moe.num_experts=4"),
    (["model.moe.num_experts=4", "model.moe.router=modality"], "set model.moe.num_experts=2"),
])
def test_clear_validation_errors(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_job(JOB, overrides)


def test_moe_needs_bottleneck_adapters():
    with pytest.raises(ConfigError, match="set model.adapter.kind=bottleneck"):
        build(["model.moe.num_experts=2", "model.adapter.kind=lora"])
    with pytest.raises(ConfigError, match="model.moe.layers: has 5, but the LM has model.lm.n_layer=2 blocks"):
        build(["model.moe.num_experts=2", "model.moe.layers=[5]"])  # refused at submit, not at rank start-up


def test_is_a_deepspeed_moe_layer():
    from deepspeed.moe.layer import MoE

    model, _ = build(["model.moe.num_experts=2"])
    assert all(isinstance(m, MoE) for m in moe_layers(model)) and MoEAdapter.__mro__[1] is MoE
