"""LiMBeR and MAE + LM through the MAGMA path, built from their shipped jobs.

LiMBeR (jobs/limber.yaml): the image encoder and the LM frozen, no adapters; the only trainable
weights are one linear map, in * out + bias parameters, and its output is that linear map of
the image features (per token, or of the mean feature into k soft prompts); a training step
changes nothing else. MAE + LM (jobs/magma_mae.yaml): its model is built from a random-weight
timm MAE ViT checkpoint saved locally (MAE's {"model": ...} wrapper), whose patch tokens (CLS
dropped) feed MAGMA's projection; only adapters and the projection train."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from dodo.config.loader import load_job
from dodo.data.collate import CaptionCollator
from dodo.data.tokenizer import load_tokenizer
from dodo.tasks import build_family_model

TOKENIZER = load_tokenizer("builtin:synthetic")


def _batch(image_size: int, n: int = 3) -> dict:
    from dodo.data.synthetic import SyntheticShapes  # captions only matter as token ids here

    data = SyntheticShapes("train", 8, image_size, seed=0)
    return CaptionCollator(TOKENIZER, 12)([data[i] for i in range(n)])


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tokens", [0, 3])
def test_limber_trains_only_one_linear_map(tokens: int) -> None:
    cfg = load_job(REPO / "jobs" / "limber.yaml", [f"model.image_prefix.tokens={tokens}"])
    torch.manual_seed(cfg.model.init_seed)
    model = build_family_model(cfg.model, TOKENIZER)
    enc, d = cfg.model.image_encoder.hidden, cfg.model.lm.d_model  # 64 -> 128
    out = d * (tokens or 1)
    trainable = _trainable(model)
    names = {"prefix.0.weight", "prefix.0.bias"} if tokens == 0 else {"prefix.proj.weight", "prefix.proj.bias"}
    assert set(trainable) == names
    assert sum(p.numel() for p in trainable.values()) == enc * out + out  # in * out + bias
    weight, bias = (trainable[n] for n in sorted(names, reverse=True))  # weight (out, enc), bias (out,)
    assert weight.shape == (out, enc)

    b = _batch(cfg.data.image_size)
    model.eval()
    with torch.no_grad():
        feats = model.image_encoder(b["images"])  # (B, 16, 64)
        want = F.linear(feats, weight, bias) if tokens == 0 else \
            F.linear(feats.mean(1), weight, bias).view(len(feats), tokens, d)
        torch.testing.assert_close(model.embed_image(b["images"]), want)
    # One optimizer step: the map moves, the encoder and the LM do not.
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    model(b["images"], b["input_ids"], b["attention_mask"]).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == names


def test_mae_lm_job_builds_from_a_local_timm_mae_checkpoint(tmp_path) -> None:
    from dodo.models.sources.libs import import_timm

    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    mae = import_timm().create_model("vit_base_patch16_224.mae", pretrained=False, num_classes=0, **tiny).eval()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae.state_dict()}, path)  # as MAE's release wraps it
    cfg = load_job(REPO / "jobs" / "magma_mae.yaml", [
        f"model.image_encoder.source.path={path}", f"model.image_encoder.source.arch_kwargs='{json.dumps(tiny)}'",
        "model.image_encoder.source.dtype=float32", "model.image_encoder.image_size=32",
        "model.image_encoder.patch_size=8", "data.image_size=32",
        # the LM: a tiny random GPT-2 instead of GPT-J's directory (the path under test is the encoder)
        "model.lm.source.kind=random", "model.lm.arch=gpt2", "model.lm.d_model=32", "model.lm.n_layer=2",
        "model.lm.n_head=2", "model.lm.n_positions=64", "model.tokenizer=builtin:synthetic"])
    assert cfg.model.image_encoder.source.kind == "timm" and not cfg.model.image_encoder.trainable
    torch.manual_seed(cfg.model.init_seed)
    model = build_family_model(cfg.model, TOKENIZER)
    b = _batch(32)
    model.eval()
    with torch.no_grad():
        feats = model.image_encoder(b["images"])
        torch.testing.assert_close(feats, mae.forward_features(b["images"])[:, 1:])  # 4 x 4 patches, no CLS
        assert model.embed_image(b["images"]).shape == (3, 16, 32)
    trainable = _trainable(model)
    assert trainable and all(n.startswith("prefix.") or ".adapter." in n for n in trainable)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    model.train()
    loss = model(b["images"], b["input_ids"], b["attention_mask"])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in trainable.values())
