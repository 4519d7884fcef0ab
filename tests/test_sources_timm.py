"""timm sources: DINO / MAE ViT names with tiny dims (timm's own VisionTransformer kwargs),
random weights saved with torch.save and safetensors, compared with timm's own model.
Tolerance: exact (torch.equal) in fp32: the same timm modules on the same tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, check_source
from dodo.models.sources.libs import import_timm
from dodo.models.sources.timmvit import TimmEncoder, load_timm

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _reference(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return import_timm().create_model(arch, pretrained=False, num_classes=0, **TINY).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch,fmt", [("vit_base_patch16_224.dino", "safetensors"),
                                      ("vit_base_patch16_224.mae", "pth")])
def test_timm_vit_matches_timm(tmp_path, arch, fmt):
    ref = _reference(arch)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(ref.state_dict(), str(path))
    else:  # MAE releases wrap the state dict: {"model": ...}
        torch.save({"model": ref.state_dict()}, str(path))
    cfg = SourceConfig(kind="timm", path=str(path), arch=arch, dtype="float32", arch_kwargs=json.dumps(TINY))
    check_source(cfg)
    enc = load_timm(cfg)
    assert isinstance(enc, TimmEncoder) and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    images = torch.randn(2, 3, 32, 32)
    feats = ref.forward_features(images)
    got = enc(images)
    assert got.shape == (2, 16, 32)  # 4 x 4 patches, CLS dropped
    assert torch.equal(got, feats[:, 1:])
    pooled = load_timm(SourceConfig(kind="timm", path=str(path), arch=arch, dtype="float32", grid=False,
                                    arch_kwargs=json.dumps(TINY)))
    assert torch.equal(pooled(images), ref.forward_head(feats, pre_logits=True))


def test_timm_bad_inputs(tmp_path):
    ref = _reference("vit_base_patch16_224.dino")
    path = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), str(path))
    with pytest.raises(ConfigError, match="not an architecture timm knows"):
        check_source(SourceConfig(kind="timm", path=str(path), arch="vit_bse_patch16_224.dino"))
    with pytest.raises(ConfigError, match="not a model timm knows"):
        load_timm(SourceConfig(kind="timm", path=str(path), arch="vit_base_patch16_224.nosuchtag",
                               arch_kwargs=json.dumps(TINY)))
    with pytest.raises(ConfigError, match=r"tensor blocks.0.attn.proj.bias has shape \(32,\).*expects \(64,\)"):
        load_timm(SourceConfig(kind="timm", path=str(path), arch="vit_base_patch16_224.dino",
                               arch_kwargs=json.dumps(dict(TINY, embed_dim=64))))
