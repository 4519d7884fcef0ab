"""open_clip sources: tiny configs of the real architecture families (modified ResNet as RN50x16,
ViT as ViT-B-16), saved in every format open_clip reads, loaded through SourceConfig, compared
with open_clip's own model on the same weights. Tolerance: exact (torch.equal) in fp32, since
the computation is open_clip's modules on the same tensors in the same order."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, check_source
from dodo.models.sources.libs import import_open_clip
from dodo.models.sources.openclip import OpenClipGrid, load_open_clip, model_config, open_clip_tokenizer

# RN50x16's family: a modified ResNet (3-conv stem, anti-aliased strides) with tiny widths.
TINY_RN = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 4},
           "text_cfg": {"width": 16, "heads": 2, "layers": 1}}
TINY_VIT = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"width": 16, "heads": 2, "layers": 1}}


def _reference(arch: str, kwargs: dict, path: str, quick_gelu: bool = False) -> torch.nn.Module:
    """open_clip's own model, loaded by open_clip's own load_checkpoint."""
    oc = import_open_clip()
    mc = model_config(SourceConfig(kind="random", arch=arch, arch_kwargs=json.dumps(kwargs)))
    mc["quick_gelu"] = quick_gelu
    model = oc.model.CLIP(**mc)
    jit = path.endswith(".pt")  # our TorchScript archive also holds the causal mask buffer
    result = oc.factory.load_checkpoint(model, path, strict=not jit, weights_only=not jit)
    assert not jit or (result.missing_keys, result.unexpected_keys) == ([], ["attn_mask"])
    return model.eval()


def _save(model: torch.nn.Module, path, fmt: str) -> str:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    elif fmt == "jit":  # OpenAI ships TorchScript archives
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.save(model.state_dict(), str(path))
    return str(path)


def _random_clip(arch: str, kwargs: dict, quick_gelu: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    mc = model_config(SourceConfig(kind="random", arch=arch, arch_kwargs=json.dumps(kwargs)))
    mc["quick_gelu"] = quick_gelu
    model = import_open_clip().model.CLIP(**mc).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so they are tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


@torch.no_grad()  # both sides on the same kernels (frozen MHA takes its fast path only without grad)
@pytest.mark.parametrize("fmt,suffix", [("jit", ".pt"), ("bin", ".bin"), ("safetensors", ".safetensors")])
def test_rn_grid_tokens_match_open_clip(tmp_path, fmt, suffix):
    quick = fmt == "jit"  # OpenAI's TorchScript files imply QuickGELU
    path = _save(_random_clip("RN50x16", TINY_RN, quick), tmp_path / f"rn{suffix}", fmt)
    cfg = SourceConfig(kind="open_clip", path=path, arch="RN50x16", dtype="float32",
                       tower="vision", grid=True, arch_kwargs=json.dumps(TINY_RN))
    check_source(cfg)
    tower = load_open_clip(cfg)
    assert isinstance(tower, OpenClipGrid) and not tower.training
    assert not any(p.requires_grad for p in tower.parameters())
    images = torch.randn(2, 3, 64, 64)
    ref = _reference("RN50x16", TINY_RN, path, quick)
    want = ref.visual.forward_intermediates(images, intermediates_only=True)["image_intermediates"][-1]
    got = tower(images)
    # 64 px / 32 = 2 x 2 grid of 32 * width channels (RN50x16 at 384 px: 12 x 12 x 3072)
    assert got.shape == (2, 4, 4 * 32)
    assert torch.equal(got, want.flatten(2).transpose(1, 2))


@torch.no_grad()
def test_vit_patch_tokens_and_full_model_match_open_clip(tmp_path):
    path = _save(_random_clip("ViT-B-16", TINY_VIT), tmp_path / "vit.safetensors", "safetensors")
    base = dict(kind="open_clip", path=path, arch="ViT-B-16", dtype="float32", arch_kwargs=json.dumps(TINY_VIT))
    ref = _reference("ViT-B-16", TINY_VIT, path)
    images = torch.randn(2, 3, 32, 32)
    grid = load_open_clip(SourceConfig(tower="vision", grid=True, **base))
    ref.visual.output_tokens = True
    pooled, tokens = ref.visual(images)
    assert torch.equal(grid(images), tokens)  # (2, 16, 32): 4 x 4 patches, CLS dropped
    full = load_open_clip(SourceConfig(tower="full", **base))
    tok = open_clip_tokenizer("ViT-B-16")
    ids = tok(["a photo of a dog", "two cats on a sofa"])
    assert ids.shape == (2, 77)
    assert torch.equal(full.encode_text(ids), ref.encode_text(ids))
    assert torch.equal(full.encode_image(images), pooled)


@torch.no_grad()
def test_bf16_vision_tower_is_cast_and_close(tmp_path):
    path = _save(_random_clip("ViT-B-16", TINY_VIT), tmp_path / "vit.bin", "bin")
    cfg = SourceConfig(kind="open_clip", path=path, arch="ViT-B-16", dtype="bfloat16",
                       arch_kwargs=json.dumps(TINY_VIT))
    tower = load_open_clip(cfg)
    assert {p.dtype for p in tower.parameters()} == {torch.bfloat16}
    images = torch.randn(2, 3, 32, 32)
    ref = _reference("ViT-B-16", TINY_VIT, path)
    ref.visual.output_tokens = True
    want = ref.visual(images)[1]
    # bf16 has 8 mantissa bits: tolerance 5e-2 relative to the token scale (LayerNorm output ~1).
    torch.testing.assert_close(tower(images).float(), want, atol=5e-2, rtol=5e-2)


def test_bad_inputs_one_line(tmp_path):
    good = _save(_random_clip("ViT-B-16", TINY_VIT), tmp_path / "vit.safetensors", "safetensors")
    with pytest.raises(ConfigError, match="does not exist"):
        check_source(SourceConfig(kind="open_clip", path=str(tmp_path / "nope.pt"), arch="ViT-B-16"))
    text = tmp_path / "weights.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError, match="is not a checkpoint file"):
        check_source(SourceConfig(kind="open_clip", path=str(text), arch="ViT-B-16"))
    with pytest.raises(ConfigError, match="did you mean ViT-B-16"):
        check_source(SourceConfig(kind="open_clip", path=good, arch="ViT-B-61"))
    wrong = dict(TINY_VIT, vision_cfg=dict(TINY_VIT["vision_cfg"], width=64))
    with pytest.raises(ConfigError, match=r"tensor visual\.\S+ has shape") as err:
        load_open_clip(SourceConfig(kind="open_clip", path=good, arch="ViT-B-16", arch_kwargs=json.dumps(wrong)))
    assert "\n" not in str(err.value)


def test_submit_checks_are_torch_free_and_the_stand_in_is_scoped(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    code = ("import sys\n"
            "from dodo.models.sources import SourceConfig, check_source\n"
            f"check_source(SourceConfig(kind='open_clip', path={str(path)!r}, arch='RN50x16'))\n"
            f"check_source(SourceConfig(kind='timm', path={str(path)!r}, arch='vit_base_patch16_224.dino'))\n"
            "assert 'torch' not in sys.modules, 'torch imported at submit'\n"
            "from dodo.models.sources.libs import import_open_clip, import_timm\n"
            "import_open_clip(); import_timm()\n"
            "from transformers.utils import import_utils\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('torchvision') is None:  # no real torchvision here\n"
            "    assert not [m for m in sys.modules if m.split('.')[0] == 'torchvision'], 'stand-in left'\n"
            "    assert not import_utils.is_torchvision_available()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
