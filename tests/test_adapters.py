"""Adapters against their references: PEFT's LoRA, the unmerged model for every merge, the
re-parameterised layer for R-Adapter; trainable counts; the base frozen and unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from dodo.adapters.config import AdapterConfig, LoRAConfig, PrefixConfig, RAdapterConfig
from dodo.adapters.inject import inject, lm_block_specs
from dodo.adapters.lora import LoRALinear
from dodo.adapters.r_adapter import RAdapterLinear
from dodo.adapters.state import (adapter_state_dict, load_adapters, merge_adapters, save_adapters,
                                 unmerge_adapters, wise_state, zero_shot_state, load_adapter_state)
from dodo.models.clip.model import ClipDualEncoder
from dodo.models.clip.config import ClipModelConfig

torch.set_default_dtype(torch.float32)


def tiny_clip(adapter: AdapterConfig, seed: int = 0) -> ClipDualEncoder:
    torch.manual_seed(seed)
    return ClipDualEncoder(ClipModelConfig(adapter=adapter), vocab_size=40, eos_token_id=0).double()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg).double().eval()


def clip_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(3, 40, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    ids[:, -1] = 0  # EOS ends every caption
    ids[1, 5] = 0
    return images, ids, mask


def clip_features(m: ClipDualEncoder, batch) -> torch.Tensor:
    images, ids, mask = batch
    return torch.cat([m.encode_image(images), m.encode_text(ids, mask)])


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """Adapters start at (or near) the identity; give them weights that change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "logit_scale" not in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# ---------------------------------------------------------------- LoRA vs PEFT


@pytest.mark.parametrize("which", ["clip", "gpt2"])
def test_lora_equals_peft(which):
    peft = pytest.importorskip("peft")
    lora = LoRAConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"] if which == "clip" else ["c_attn", "c_fc"])
    if which == "clip":
        ours = tiny_clip(AdapterConfig(kind="lora", locations=["attention"], lora=lora)).eval()
        base = tiny_clip(AdapterConfig(kind="none")).eval().clip
        targets = [f"{t}_model.encoder.layers.{i}.self_attn.{p}" for t in ("vision", "text")
                   for i in range(2) for p in ("q_proj", "v_proj")]
    else:
        base = tiny_gpt2()
        ours = copy.deepcopy(base).requires_grad_(False)
        inject(ours, lm_block_specs(ours), AdapterConfig(kind="lora", locations=["attention", "mlp"], lora=lora))
        ours.double()
        targets = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "mlp.c_fc")]
    randomize_adapters(ours)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                   fan_in_fan_out=which == "gpt2"))
    ref_modules = dict(ref.named_modules())
    our_root = ours.clip if which == "clip" else ours
    for name in targets:
        mine = our_root.get_submodule(name)
        assert isinstance(mine, LoRALinear)
        theirs = ref_modules[f"base_model.model.{name}"]
        theirs.lora_A["default"].weight.data.copy_(mine.lora_A.weight)
        theirs.lora_B["default"].weight.data.copy_(mine.lora_B.weight)
    ref.eval()
    if which == "clip":
        images, ids, mask = clip_batch()
        got = ours.clip(pixel_values=images, input_ids=ids, attention_mask=mask)
        want = ref(pixel_values=images, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(got.logits_per_image, want.logits_per_image, rtol=1e-10, atol=1e-10)
    else:
        ids = torch.randint(0, 50, (2, 12))
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-10, atol=1e-10)
    # Same trainable count as PEFT.
    assert (sum(p.numel() for n, p in our_root.named_parameters() if "lora_" in n)
            == sum(p.numel() for n, p in ref.named_parameters() if p.requires_grad))


# ---------------------------------------------------------------- merges


MERGEABLE = [
    AdapterConfig(kind="lora", locations=["attention", "mlp"], lora=LoRAConfig(r=4, targets=["q_proj", "v_proj", "fc1"])),
    AdapterConfig(kind="r_adapter", locations=["attention", "mlp"], r_adapter=RAdapterConfig(rank=0, alpha=0.8)),
    AdapterConfig(kind="r_adapter", locations=["attention", "mlp"], r_adapter=RAdapterConfig(rank=3, alpha=0.5)),
]


@pytest.mark.parametrize("cfg", MERGEABLE, ids=["lora", "r_adapter_full", "r_adapter_lowrank"])
def test_merge_equals_unmerged_and_unmerge_restores(cfg):
    model = tiny_clip(cfg).eval()
    randomize_adapters(model)
    for _, m in model.named_modules():
        if isinstance(m, RAdapterLinear):  # EMA differs from the live weights
            m.update_ema()
            m.ema_scale.fill_(0.3)
    batch = clip_batch()
    base_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        unmerged = clip_features(model, batch)
        assert merge_adapters(model) == len(model.adapted_modules)
        merged = clip_features(model, batch)
        changed = [n for n, p in model.named_parameters() if not p.requires_grad and not torch.equal(p, base_before[n])]
        unmerge_adapters(model)
        again = clip_features(model, batch)
    torch.testing.assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    assert len(changed) == len(model.adapted_modules)  # the merge really went into the base weights
    torch.testing.assert_close(again, unmerged, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, base_before[n], rtol=1e-13, atol=1e-13)


def test_merge_refuses_nonlinear_adapters():
    model = tiny_clip(AdapterConfig(kind="bottleneck"))
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(model)


# ---------------------------------------------------------------- R-Adapter


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rank", [0, 2])
def test_r_adapter_reparameterisation_is_exact(kind, rank):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double() if kind == "linear" else Conv1D(5, 6).double()
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    w_org = (base.weight.T if kind == "linear" else base.weight).detach().clone()  # (in, out): row convention
    b_org = base.bias.detach().clone()
    base.requires_grad_(False)
    layer = RAdapterLinear(base, RAdapterConfig(rank=rank, ema=False, drop_prob=0.0)).double().eval()
    randomize_adapters(layer)
    w_adp, s = layer.matrix(ema=False)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    # The paper's formula: W_rep = W_org (W_adp s + I), b_rep = b_org (W_adp s + I)
    eye = torch.eye(5, dtype=torch.float64)
    w_rep, b_rep = w_org @ (s * w_adp + eye), b_org @ (s * w_adp + eye)
    with torch.no_grad():
        h = layer(x)
        torch.testing.assert_close(h, x @ w_rep + b_rep, rtol=1e-12, atol=1e-12)
        layer.merge()
        torch.testing.assert_close(layer(x), h, rtol=1e-12, atol=1e-12)
        w_now = base.weight.T if kind == "linear" else base.weight
        torch.testing.assert_close(w_now, w_rep, rtol=1e-12, atol=1e-12)


def test_r_adapter_dropping_ema_and_rescaling():
    torch.manual_seed(0)
    layer = RAdapterLinear(nn.Linear(4, 4).double(), RAdapterConfig(rank=0, drop_prob=0.5, ema_momentum=0.9, alpha=0.5))
    layer.double()
    randomize_adapters(layer)
    x = torch.randn(64, 3, 4, dtype=torch.float64)
    y = layer.base(x)
    layer.train()
    with torch.no_grad():
        branch = layer.scale * (y @ layer.weight)
    h = layer(x)  # first training call: no EMA update yet
    kept = torch.isclose(h, y + 2 * branch).all(-1).all(-1)
    dropped = torch.isclose(h, y).all(-1).all(-1)
    assert bool((kept | dropped).all()) and 10 < int(kept.sum()) < 54  # per sample, p = 0.5, 1/(1-p) = 2
    ema_before = layer.ema_weight.clone()
    layer(x)  # second call: EMA <- 0.9 EMA + 0.1 W
    torch.testing.assert_close(layer.ema_weight, 0.9 * ema_before + 0.1 * layer.weight.detach())
    layer.eval()
    w_ema, s_ema = layer.matrix(ema=True)
    torch.testing.assert_close(layer(x), y + 0.5 * s_ema * (y @ w_ema))  # no dropping, EMA, alpha
    layer.alpha = 0.0
    torch.testing.assert_close(layer(x), y)  # alpha = 0: the frozen layer


# ---------------------------------------------------------------- counts and freezing


def _expected_count(kind: str) -> int:
    d, h = 64, 64 // 4  # tiny CLIP: both towers d=64, 2 layers; bottleneck downsample 4
    sites = 2 * 2  # 2 towers x 2 layers
    per_block = {
        "bottleneck": 2 * ((d * h + h) + (h * d + d)),  # attention and mlp
        "lora": 2 * 8 * (d + d),  # q_proj and v_proj, r = 8
        "r_adapter": 2 * (d * d + 1),  # after out_proj and fc2, full rank, plus the scale
        "prefix": 30 * d + (d * 512 + 512) + (512 * 2 * d + 2 * d),
        "film": 2 * 2 * (32 * d + d),  # gamma and beta at attention and mlp
    }[kind]
    extra = {"film": 32}.get(kind, 0)  # one task embedding
    return sites * per_block + extra + 1  # + the learnable temperature


ALL_KINDS = {
    "bottleneck": AdapterConfig(kind="bottleneck", locations=["attention", "mlp"]),
    "lora": AdapterConfig(kind="lora", locations=["attention"]),
    "r_adapter": AdapterConfig(kind="r_adapter", locations=["attention", "mlp"]),
    "prefix": AdapterConfig(kind="prefix"),
    "mam": AdapterConfig(kind="mam", placement="parallel", downsample=2, scaling=4.0,
                         prefix=PrefixConfig(length=5, bottleneck=16)),
    "film": AdapterConfig(kind="film", locations=["attention", "mlp"]),
}


@pytest.mark.parametrize("kind", ["bottleneck", "lora", "r_adapter", "prefix", "film"])
def test_trainable_counts(kind):
    model = tiny_clip(ALL_KINDS[kind])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _expected_count(kind)


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_base_frozen_and_unchanged_after_steps(kind):
    model = tiny_clip(ALL_KINDS[kind]).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and trainable and all("logit_scale" in n or any(k in n for k in (
        "adapter", "lora_", "dodo_prefix", "weight", "bias", "down", "up", "scale", "gamma", "beta", "tasks"))
        for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = model(*clip_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    moved = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert len(moved) >= len(trainable) // 2, moved


# ---------------------------------------------------------------- prefix, FiLM, MAM


def reference_attention(q, k, v, mask, scale):
    w = (q @ k.transpose(-1, -2)) * scale + mask
    return torch.softmax(w, -1) @ v


def test_prefix_attention_equals_explicit_concatenation():
    model = tiny_clip(AdapterConfig(kind="prefix", prefix=PrefixConfig(length=3, bottleneck=8))).eval()
    attn = model.clip.text_model.encoder.layers[0].self_attn
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    causal = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    got = attn(x, attention_mask=causal)[0]
    heads = lambda t: t.view(2, -1, 4, 16).transpose(1, 2)  # noqa: E731
    pk, pv = attn.dodo_prefix(2, torch.float64)
    k = torch.cat([pk, heads(attn.k_proj(x))], 2)
    v = torch.cat([pv, heads(attn.v_proj(x))], 2)
    mask = torch.cat([torch.zeros(1, 1, 5, 3, dtype=torch.float64), causal], -1)
    out = reference_attention(heads(attn.q_proj(x)), k, v, mask, 16 ** -0.5)
    want = attn.out_proj(out.transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_prefix_in_gpt2_causal_lm_matches_reference():
    """GPT-2 with prefix tuning: the first token's output only depends on itself and the prefix."""
    lm = tiny_gpt2()
    inject(lm, lm_block_specs(lm), AdapterConfig(kind="prefix", prefix=PrefixConfig(length=4, bottleneck=8)))
    ids = torch.randint(0, 50, (2, 6))
    full = lm(ids).logits
    prefix_only = lm(ids[:, :3]).logits  # causality: later tokens never leak backwards
    torch.testing.assert_close(full[:, :3], prefix_only, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the prefix does change the output
        for m in lm.modules():
            if hasattr(m, "dodo_prefix"):
                del m.dodo_prefix
    assert not torch.allclose(lm(ids).logits, full)


def test_film_is_identity_at_init_then_affine():
    base = tiny_clip(AdapterConfig(kind="none")).eval()
    film = tiny_clip(AdapterConfig(kind="film", locations=["mlp"])).eval()
    batch = clip_batch()
    with torch.no_grad():
        torch.testing.assert_close(clip_features(film, batch), clip_features(base, batch))
        wrapped = film.clip.vision_model.encoder.layers[0].mlp
        wrapped.gamma.bias.fill_(0.5)
        wrapped.beta.bias.fill_(0.25)
        x = torch.randn(4, 5, 64, dtype=torch.float64)
        film.film_condition.set_task(torch.zeros(4, dtype=torch.long))
        torch.testing.assert_close(wrapped(x), 1.5 * wrapped.base(x) + 0.25)


def test_mam_has_prefix_and_parallel_adapter():
    model = tiny_clip(ALL_KINDS["mam"])
    layer = model.clip.vision_model.encoder.layers[1]
    assert hasattr(layer.self_attn, "dodo_prefix")
    assert type(layer.mlp).__name__ == "AdaptedSublayer" and layer.mlp.placement == "parallel"
    assert layer.mlp.scaling == 4.0 and layer.mlp.adapter.down.out_features == 32


def test_mam_refuses_sequential_placement():
    with pytest.raises(ValueError, match="placement"):
        tiny_clip(AdapterConfig(kind="mam"))


# ---------------------------------------------------------------- selection by name


def test_selection_by_tower_layer_and_pattern():
    model = tiny_clip(AdapterConfig(kind="lora", towers=["text"], layers=[-1], locations=["attention", "mlp"],
                                    lora=LoRAConfig(targets=["q_proj", "fc2"])))
    assert model.adapted_modules == ["text_model.encoder.layers.1.self_attn.q_proj",
                                     "text_model.encoder.layers.1.mlp.fc2"]
    model = tiny_clip(AdapterConfig(kind="r_adapter", locations=["attention", "mlp"], targets=[r"layers\.0\."]))
    assert model.adapted_modules == [f"{t}_model.encoder.layers.0.{s}" for t in ("vision", "text")
                                     for s in ("self_attn.out_proj", "mlp.fc2")]
    with pytest.raises(ValueError, match="matched no module"):
        tiny_clip(AdapterConfig(kind="lora", lora=LoRAConfig(targets=["nope"])))
    with pytest.raises(ValueError, match="towers"):
        tiny_clip(AdapterConfig(kind="lora", towers=["lm"]))


def test_legacy_bottleneck_names_unchanged():
    lm = tiny_gpt2()
    from dodo.adapters.inject import inject_adapters
    names = inject_adapters(lm, AdapterConfig(), 32)
    assert names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert {n for n, p in lm.named_parameters() if "adapter" in n} >= {"transformer.h.0.mlp.adapter.down.weight",
                                                                       "transformer.h.0.mlp.adapter.up.weight"}


# ---------------------------------------------------------------- save / load, WiSE


@pytest.mark.parametrize("kind", ["lora", "r_adapter", "bottleneck"])
def test_save_and_load_adapter_weights_alone(kind, tmp_path):
    cfg = ALL_KINDS[kind]
    trained = tiny_clip(cfg).eval()
    randomize_adapters(trained)
    for m in trained.modules():
        if isinstance(m, RAdapterLinear):
            m.momentum = 0.5
            m.update_ema()
    path = save_adapters(trained, tmp_path / "adapters.safetensors")
    fresh = tiny_clip(cfg, seed=0).eval()  # same frozen base, fresh adapters
    batch = clip_batch()
    assert not torch.allclose(clip_features(fresh, batch), clip_features(trained, batch))
    load_adapters(fresh, path)
    torch.testing.assert_close(clip_features(fresh, batch), clip_features(trained, batch), rtol=0, atol=0)
    state = adapter_state_dict(trained)
    assert all("lora_" in k or "adapter" in k or "logit_scale" in k or k.rsplit(".", 1)[-1] in
               ("weight", "scale", "ema_weight", "ema_scale") for k in state)
    other = tiny_clip(ALL_KINDS["film"])
    with pytest.raises(ValueError, match="does not fit"):
        load_adapters(other, path)


@pytest.mark.parametrize("kind", ["lora", "r_adapter", "bottleneck"])
def test_wise_endpoints_and_midpoint(kind):
    cfg = copy.deepcopy(ALL_KINDS[kind])
    cfg.r_adapter.ema = False
    base = tiny_clip(AdapterConfig(kind="none")).eval()
    model = tiny_clip(cfg).eval()
    randomize_adapters(model)
    batch = clip_batch()
    tuned, zs = adapter_state_dict(model), zero_shot_state(model)
    with torch.no_grad():
        adapted = clip_features(model, batch)
        load_adapter_state(model, wise_state(zs, tuned, 0.0))
        torch.testing.assert_close(clip_features(model, batch), clip_features(base, batch))
        load_adapter_state(model, wise_state(zs, tuned, 1.0))
        torch.testing.assert_close(clip_features(model, batch), adapted)
