"""Weak language supervision (dodo/models/weak): reference tests of each core computation.

The ViT run block by block against timm's own forward (exact: the same modules on the same
tensors), MAE's masked encoder and loss against naive twins, FiLM on language, token replay as
docs/methods.md defines it, the adversarial program's shape and frame mask, the label map, and
cross-modal reprogramming (shapes, padding, only the map trains). Random-weight tiny timm ViTs
are saved with safetensors / torch.save, as DINO and MAE ship them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dodo.adapters.config import AdapterConfig, FiLMConfig
from dodo.adapters.film import FiLMCondition, FiLMSublayer
from dodo.models.sources.config import SourceConfig
from dodo.models.sources.libs import import_timm
from dodo.models.weak.config import WeakConfig, WeakModelConfig
from dodo.models.weak.model import WeakModel, mae_loss
from dodo.models.weak.replay import TokenReplay
from dodo.models.weak.reprogram import AdversarialProgram, LabelMap, fixed_label_map
from dodo.models.weak.vit import ViTRunner, build_vit

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
VOCAB = 40


def _timm_ref(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return import_timm().create_model(arch, pretrained=False, num_classes=0, **TINY).eval()


def _tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic stand-in tokenizer: character codes mod the vocabulary (ids 1..), pad 0."""
    ids = [[1 + ord(c) % (VOCAB - 1) for c in t][:24] or [1] for t in texts]
    n = max(map(len, ids))
    out = torch.zeros(len(ids), n, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return out, mask


def _cfg(objective: str = "mae_contrastive", adapter: AdapterConfig | None = None, **weak) -> WeakModelConfig:
    return WeakModelConfig(adapter=adapter or AdapterConfig(kind="none"),
                           weak=WeakConfig(objective=objective, text_hidden=32, text_heads=2, projection_dim=16,
                                           vision=SourceConfig(kind="random", arch="vit_base_patch16_224.dino",
                                                               arch_kwargs=json.dumps(TINY)), **weak))


def _model(objective: str = "mae_contrastive", adapter: AdapterConfig | None = None, **weak) -> WeakModel:
    torch.manual_seed(0)  # the frozen random towers: the same for every model built here
    return WeakModel(_cfg(objective, adapter, **weak), VOCAB, 0)


# ---------------------------------------------------------------- the ViT, MAE


@torch.no_grad()
@pytest.mark.parametrize("arch,fmt", [("vit_base_patch16_224.dino", "safetensors"),
                                      ("vit_base_patch16_224.mae", "pth")])
def test_vit_runner_equals_timm_forward_features(tmp_path, arch, fmt):
    ref = _timm_ref(arch)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(ref.state_dict(), str(path))
    else:  # MAE releases wrap the state dict: {"model": ...}
        torch.save({"model": ref.state_dict()}, str(path))
    net = build_vit(SourceConfig(kind="timm", path=str(path), arch=arch, dtype="float32", arch_kwargs=json.dumps(TINY)))
    assert not any(p.requires_grad for p in net.parameters())
    images = torch.randn(3, 3, 32, 32)
    runner = ViTRunner(net)
    want = ref.forward_features(images)  # (3, 1 + 16, 32)
    assert torch.equal(runner.features(images), want)
    x = runner.add_positions(runner.embed_images(images))
    assert torch.equal(runner.tokens(x, keep=torch.arange(16).expand(3, 16)), want)  # keep all = no mask


@torch.no_grad()
def test_mae_encoder_sees_only_visible_patches_and_loss_matches_naive():
    ref = _timm_ref("vit_base_patch16_224.mae")
    runner = ViTRunner(ref)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 9, 10, 12, 15]] = True
    mask[1, [1, 2, 4, 7, 8, 11, 13, 14]] = True
    keep = (~mask).nonzero()[:, 1].view(2, -1)
    got = runner.tokens(runner.add_positions(runner.embed_images(images)), keep=keep)  # (2, 1 + 8, 32)
    for b in range(2):  # naive: timm's own pieces on the visible sequence of one image
        x = ref._pos_embed(ref.patch_embed(images[b: b + 1]))
        x = torch.cat([x[:, :1], x[:, 1:][:, ~mask[b]]], dim=1)
        torch.testing.assert_close(got[b: b + 1], ref.norm(ref.blocks(x)), rtol=1e-5, atol=1e-5)
    # MAE loss: per masked patch, MSE against the patch's pixels normalised by its own mean / var
    pred = torch.randn(2, 16, 8 * 8 * 3, dtype=torch.float64)
    total, n = 0.0, 0
    for b in range(2):
        for k in range(16):
            if not mask[b, k]:
                continue
            r, c = divmod(k, 4)
            patch = images[b, :, 8 * r: 8 * r + 8, 8 * c: 8 * c + 8].permute(1, 2, 0).reshape(-1).double()
            target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            total += float(((pred[b, k] - target) ** 2).mean())
            n += 1
    # mae_loss computes in fp32 (as in training): relative tolerance of fp32 sums over 8 x 192 terms
    assert abs(float(mae_loss(pred, images.double(), mask, 8)) - total / n) < 1e-6 * total / n


@torch.no_grad()
def test_backbone_embedding_is_the_vits_cls():
    model = _model()
    images = torch.randn(2, 3, 32, 32)
    want = F.normalize(model.vit.forward_features(images)[:, 0], dim=-1)  # timm's own forward, [CLS]
    torch.testing.assert_close(model.backbone_embedding(images), want)


def test_mae_contrastive_trains_adapters_heads_only():
    model = _model(adapter=AdapterConfig(kind="bottleneck", locations=["mlp"]))
    model.attach_texts(_tokenize)
    ids, mask = _tokenize(["a dog on a bench", "a dog on a bench", "a red bus", "two cats"])
    loss = model(torch.randn(4, 3, 32, 32), ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    loss.backward()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vit", "image_proj", "text_proj", "logit_scale", "decoder"}
    assert all(".adapter" in n or "adapter" in n for n, p in model.vit.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


# ---------------------------------------------------------------- FiLM on language


def test_film_text_condition_reference_and_identity_at_init():
    torch.manual_seed(1)
    base = torch.nn.Linear(6, 6)
    cond = FiLMCondition(4)
    film = FiLMSublayer(base, 6, cond)
    x = torch.randn(2, 3, 6)
    emb = torch.tensor([3.0, 0.0, 4.0, 0.0])  # a known text embedding, norm 5
    cond.set_text(emb)
    assert torch.equal(film(x), base(x))  # zero-initialised gamma / beta: identity
    with torch.no_grad():
        for lin in (film.gamma, film.beta):
            lin.weight.normal_()
            lin.bias.normal_()
    unit = torch.tensor([0.6, 0.0, 0.8, 0.0])  # the condition is L2-normalised
    gamma = film.gamma.weight @ unit + film.gamma.bias  # (6,)
    beta = film.beta.weight @ unit + film.beta.bias
    torch.testing.assert_close(film(x), base(x) * (1 + gamma) + beta)
    cond.set_text(torch.stack([emb, 2 * emb]))  # per-sample captions: same direction, same modulation
    torch.testing.assert_close(film(x), base(x) * (1 + gamma) + beta)


@torch.no_grad()
def test_weak_film_on_language_is_identity_at_init_and_follows_the_caption():
    film = AdapterConfig(kind="film", locations=["mlp"], film=FiLMConfig(condition="text", caption=True))
    plain, adapted = _model(), _model(adapter=film)
    for m in (plain, adapted):
        m.attach_texts(_tokenize)
    images = torch.randn(2, 3, 32, 32)
    # the ViT's tokens (the heads after it draw other random numbers once adapters are built)
    assert torch.equal(plain.image_tokens(images), adapted.image_tokens(images))
    for n, p in adapted.named_parameters():
        if ".gamma." in n or ".beta." in n:
            p.normal_(std=0.5)
    ids, mask = _tokenize(["a dog", "a bus on a street"])
    caption = adapted.text_features(ids, mask)
    g = torch.Generator().manual_seed(0)
    loss_caption = adapted.mae(images, text=caption, generator=g)[0]
    g = torch.Generator().manual_seed(0)
    loss_prompt = adapted.mae(images, text=None, generator=g)[0]
    assert float(loss_caption) != float(loss_prompt)  # the caption's embedding is the condition
    assert torch.allclose(adapted.film_condition.value, F.normalize(adapted.prompt_embedding, dim=-1)[None])


# ---------------------------------------------------------------- token replay


@torch.no_grad()
@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_token_replay_as_documented(tokens):
    ref = _timm_ref("vit_base_patch16_224.dino")
    runner = ViTRunner(ref)
    replay = TokenReplay(32, 3, source=0, targets=[2], tokens=tokens, bottleneck=4)
    x = runner.add_positions(runner.embed_images(torch.randn(2, 3, 32, 32)))
    assert torch.equal(runner.tokens(x, replay=replay), runner.tokens(x))  # gate 0: identity
    branch = replay.branches["2"]
    branch.gate.fill_(0.7)
    h0 = ref.blocks[0](x)
    h1 = ref.blocks[1](h0)
    s = h0[:, :1] if tokens == "cls" else h0
    add = torch.tanh(torch.tensor(0.7)) * branch.up(F.gelu(branch.down(F.layer_norm(s, (32,), branch.norm.weight,
                                                                                    branch.norm.bias))))
    want = ref.norm(ref.blocks[2](h1 + add))  # H_2 <- H_2 + tanh(g) U GELU(D LN(H_src))
    torch.testing.assert_close(runner.tokens(x, replay=replay), want, rtol=1e-5, atol=1e-5)


def test_token_replay_gate_receives_gradient_at_init_and_refuses_bad_layers():
    ref = _timm_ref("vit_base_patch16_224.dino")
    runner = ViTRunner(ref)
    replay = TokenReplay(32, 3, source=0, targets=[], bottleneck=4)
    assert sorted(replay.branches) == ["1", "2"]  # empty targets: every later block
    x = runner.add_positions(runner.embed_images(torch.randn(2, 3, 32, 32)))
    runner.tokens(x, replay=replay).pow(2).sum().backward()
    assert all(float(b.gate.grad.abs()) > 0 for b in replay.branches.values())
    with pytest.raises(ValueError, match="do not fit a ViT of 3 blocks"):
        TokenReplay(32, 3, source=0, targets=[3])


# ---------------------------------------------------------------- reprogramming


def test_adversarial_program_shape_mask_and_centre_is_the_input():
    prog = AdversarialProgram(canvas=32, inner=16)
    assert prog.program.shape == (3, 32, 32) and prog.mask.shape == (1, 32, 32)
    assert prog.mask[:, 8:24, 8:24].abs().sum() == 0 and int(prog.mask.sum()) == 32 * 32 - 16 * 16
    with torch.no_grad():
        prog.program.normal_(std=3.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = prog(images)
    small = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out[:, :, 8:24, 8:24], small)  # the centre holds the resized input exactly
    frame = prog.mask.bool().expand(3, 32, 32)
    assert torch.equal(out[0][frame], torch.tanh(prog.program)[frame])  # the frame: the program only
    assert float(out.abs().max()) <= max(1.0, float(small.abs().max()))  # tanh-bounded
    inner = AdversarialProgram(canvas=32, inner=16)(torch.randn(1, 3, 16, 16))  # already inner-sized: no resize
    assert inner.shape == (1, 3, 32, 32)


def test_label_map_fixed_and_learned():
    m = fixed_label_map(7, 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    logits = torch.randn(4, 7)
    p = logits.softmax(-1)
    want = torch.stack([p[:, [0, 3, 6]].sum(1), p[:, [1, 4]].sum(1), p[:, [2, 5]].sum(1)], 1).log()
    torch.testing.assert_close(LabelMap(7, 3)(logits), want)
    learned = LabelMap(7, 3, learned=True)
    torch.testing.assert_close(learned(logits), torch.stack(
        [logits[:, [0, 3, 6]].mean(1), logits[:, [1, 4]].mean(1), logits[:, [2, 5]].mean(1)], 1))
    assert learned.weight.requires_grad and not any(p.requires_grad for p in LabelMap(7, 3).parameters())
    with pytest.raises(ValueError, match="cannot cover"):
        fixed_label_map(2, 3)


def _frozen_step(model: WeakModel, images, ids, mask) -> set[str]:
    """One SGD step on the target loss; returns the names of the parameters that changed."""
    before = {n: p.detach().clone() for n, p in model.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(images, ids, mask, labels=torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    return {n for n, p in model.state_dict().items() if not torch.equal(p, before[n])}


def test_reprogram_trains_only_the_program():
    model = _model("reprogram")
    model.attach_texts(_tokenize, ["cat", "dog", "car", "ship", "frog", "horse"], 3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["program.program"]
    ids, mask = _tokenize(["", "", "", ""])
    assert _frozen_step(model, torch.randn(4, 3, 32, 32), ids, mask) == {"program.program"}


@torch.no_grad()
def test_reprogramming_starts_from_a_trained_run_frozen():
    """model.weak.reprogram.init_from: the mae_contrastive run's FiLM adapters, projections and
    temperature become the frozen source model (its trainable state, as the train layer reads it)."""
    from dodo.adapters.state import adapter_state_dict
    from dodo.adapters.transfer import AdapterSource
    from dodo.models.registry import InitState
    from dodo.models.weak.model import build

    film = AdapterConfig(kind="film", locations=["mlp"], film=FiLMConfig(condition="text", prompt="a photo of"))
    trained = _model(adapter=film)
    for p in trained.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.3)
    src = AdapterSource("runs/mae/1", "runs/mae/1/checkpoints/step_30", film, adapter_state_dict(trained))
    torch.manual_seed(0)  # the same frozen towers as `trained`
    model = build(_cfg("reprogram"), VOCAB, 0, None, InitState(adapters=[src]))
    for m in (trained, model):
        m.attach_texts(_tokenize, ["cat", "dog", "car"], 3)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.image_tokens(images), trained.image_tokens(images))  # FiLM on the same prompt
    assert torch.equal(model.image_proj.weight, trained.image_proj.weight)
    assert torch.equal(model.logit_scale, trained.logit_scale)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["program.program"]
    replayed = AdapterSource("r", "r", AdapterConfig(kind="none"), {**src.state, "replay.branches.1.gate": torch.zeros(1)})
    with pytest.raises(ValueError, match="token replay"):
        build(_cfg("reprogram"), VOCAB, 0, None, InitState(adapters=[replayed]))


def test_cross_modal_shapes_padding_and_only_the_map_trains():
    model = _model("cross_modal")
    model.attach_texts(_tokenize, ["cat", "dog", "car", "ship"], 3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"token_map.net.weight", "token_map.net.bias"}
    ids, mask = _tokenize(["a dog runs", "a bus", "two small cats", "a"])
    with torch.no_grad():
        emb = model.text.get_input_embeddings()(ids)
        assert model.token_map(emb).shape == (4, ids.shape[1], 32)  # text width -> the ViT's patch width
        out = model.cross_modal_tokens(ids, mask)
        assert out.shape == (4, 1 + ids.shape[1], 32)
        other = ids.masked_fill(mask == 0, 7)  # different ids under the padding: the same [CLS]
        torch.testing.assert_close(model.cross_modal_tokens(other, mask)[:, 0], out[:, 0])
        assert model.target_logits(torch.zeros(4, 3, 32, 32), ids, mask).shape == (4, 3)
    changed = _frozen_step(model, torch.randn(4, 3, 32, 32), ids, mask)
    assert changed == {"token_map.net.weight", "token_map.net.bias"}
    too_long, long_mask = _tokenize(["x" * 24] * 2)
    with pytest.raises(ValueError, match="exceed the ViT's"):
        model.cross_modal_tokens(torch.cat([too_long, too_long], 1), torch.cat([long_mask, long_mask], 1))
