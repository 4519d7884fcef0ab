"""A checkpoint in Aleph-Alpha MAGMA's layout, made here from a tiny config with their module
names (image_prefix.enc/proj/ln, lm.transformer.h.<i>.attn.attention.*, mlp.c_fc/c_proj, their
adapter wrappers and the word_embedding/transformer aliases, saved as {"module": sd} by
torch.save), loads into dodo's modules with equal logits. Tolerance: exact in fp32 (the same
operations; a + b and a * s are commutative bitwise)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

from dodo.adapters.config import AdapterConfig
from dodo.adapters.inject import inject_adapters
from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig
from dodo.models.sources.libs import import_open_clip
from dodo.models.sources.magma_ckpt import load_magma_checkpoint
from dodo.models.sources.openclip import OpenClipGrid, model_config

TINY_RN = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 4},
           "text_cfg": {"width": 16, "heads": 2, "layers": 1}}
D, V = 32, 53


class TheirAdapter(nn.Module):  # names as in their adapters.py: .adapter = Sequential([LN,] Linear, ReLU, Linear)
    def __init__(self, dim: int, factor: int, ln: bool, module: nn.Module | None = None, scaled: bool = False,
                 wrapper: str = "module"):
        super().__init__()
        layers = ([nn.LayerNorm(dim)] if ln else []) + [nn.Linear(dim, dim // factor), nn.ReLU(),
                                                        nn.Linear(dim // factor, dim)]
        self.adapter = nn.Sequential(*layers)
        for p in self.adapter.parameters():
            nn.init.normal_(p, std=0.2)  # a trained adapter, clearly not the identity
        self.wrapper = wrapper
        if module is not None:
            setattr(self, wrapper, module)
        self.adapter_scale = nn.Parameter(torch.full((1,), 0.7)) if scaled else 1

    def forward(self, x=None, *args, **kwargs):
        if x is None:  # transformers 5 passes hidden_states by keyword (the fork passed it first)
            x = kwargs.pop("hidden_states")
        if self.wrapper == "attn_block":  # their AdapterWrapper: sequential around attention
            out = self.attn_block(x, *args, **kwargs)
            return (out[0] + self.adapter(out[0]),) + tuple(out[1:])
        if not hasattr(self, "module"):  # inside nn.Sequential(mlp, adapter): sequential
            return self.adapter(x) + x
        out = self.module(x, *args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.adapter(x) * self.adapter_scale,) + tuple(out[1:])
        return out + self.adapter(x) * self.adapter_scale


class TheirPrefix(nn.Module):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.enc = visual
        self.proj = nn.Linear(visual.layer4[-1].conv3.out_channels, D)
        self.dropout = nn.Dropout(0.1)
        self.ln = nn.LayerNorm(D)


def _visual() -> nn.Module:
    mc = model_config(SourceConfig(kind="random", arch="RN50x16", arch_kwargs=json.dumps(TINY_RN)))
    visual = import_open_clip().model.CLIP(**mc).visual
    visual.attnpool = nn.Identity()
    return visual


def _lm() -> nn.Module:
    return tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_positions=64, n_embd=D, n_layer=2, n_head=2,
                                            rotary_dim=8)).eval()


def _fork_names(name: str) -> str:
    """HF GPT-J names -> the finetuneanon GPT-Neo (jax=True) names MAGMA's LM has."""
    for a, b in ((".attn.q_proj", ".attn.attention.q_proj"), (".attn.k_proj", ".attn.attention.k_proj"),
                 (".attn.v_proj", ".attn.attention.v_proj"), (".attn.out_proj", ".attn.attention.out_proj"),
                 (".fc_in.", ".c_fc."), (".fc_out.", ".c_proj.")):
        name = name.replace(a, b)
    for a, b in ((".module.q_proj", ".module.attention.q_proj"), (".attn_block.q_proj", ".attn_block.attention.q_proj")):
        name = name.replace(a, b)
    for proj in ("k_proj", "v_proj", "out_proj"):
        for w in ("module", "attn_block"):
            name = name.replace(f".{w}.{proj}", f".{w}.attention.{proj}")
    return name


class TheirMagma(nn.Module):
    def __init__(self, mlp: str, attn: str | None, factor: int, ln: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lm = _lm()
        self.word_embedding = self.lm.transformer.wte  # aliases, as their class registers them
        self.transformer = self.lm.transformer.h
        for block in self.transformer:
            if mlp == "normal":
                block.mlp = nn.Sequential(block.mlp, TheirAdapter(D, factor, ln))
            else:
                block.mlp = TheirAdapter(D, factor, ln, block.mlp, scaled=mlp == "scaled_parallel")
            if attn == "normal":
                block.attn = TheirAdapter(D, factor, ln, block.attn, wrapper="attn_block")
            elif attn:
                block.attn = TheirAdapter(D, factor, ln, block.attn, scaled=attn == "scaled_parallel")
        self.image_prefix = TheirPrefix(_visual())
        with torch.no_grad():
            for m in self.image_prefix.enc.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, images, ids):
        p = self.image_prefix
        x = p.enc.layer4(p.enc.layer3(p.enc.layer2(p.enc.layer1(p.enc.stem(images)))))
        x = p.ln(p.dropout(p.proj(x.flatten(2).transpose(1, 2))))  # "b d h w -> b (h w) d"
        return self.lm(inputs_embeds=torch.cat([x, self.word_embedding(ids)], 1)).logits

    def their_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {_fork_names(k): v for k, v in self.state_dict().items()}
        for i in range(len(self.transformer)):  # the fork's attention buffers are saved too
            base = f"lm.transformer.h.{i}.attn." + ("" if "lm.transformer.h.0.attn.attention.q_proj.weight" in sd
                                                    else "module." if any(".attn.module." in k for k in sd)
                                                    else "attn_block.")
            sd[base + "attention.masked_bias"] = torch.tensor(-1e9)
            sd[base + "attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        return sd


class DodoSide(nn.Module):
    """dodo's modules under dodo's names: an open_clip grid encoder, the prefix, HF GPT-J with adapters."""

    def __init__(self, cfg: AdapterConfig | None, attn_cfg: AdapterConfig | None):
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.net = OpenClipGrid(_visual())
        self.prefix = nn.Sequential(nn.Linear(self.image_encoder.net.hidden, D), nn.Dropout(0.1), nn.LayerNorm(D))
        self.lm = _lm()
        for c in (cfg, attn_cfg):
            if c is not None:
                inject_adapters(self.lm, c, D)
        self.eval()

    def forward(self, images, ids):
        x = self.prefix(self.image_encoder.net(images))
        return self.lm(inputs_embeds=torch.cat([x, self.lm.get_input_embeddings()(ids)], 1)).logits


@torch.no_grad()
@pytest.mark.parametrize("mlp,attn,factor,ln", [("normal", None, 4, False),  # MAGMA v1
                                               ("normal", "normal", 8, True),
                                               ("scaled_parallel", "parallel", 8, False)])
def test_their_checkpoint_loads_with_equal_logits(tmp_path, mlp, attn, factor, ln):
    theirs = TheirMagma(mlp, attn, factor, ln)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": theirs.their_state_dict()}, path)  # DeepSpeed's layout, as they released it
    sd, layout = load_magma_checkpoint(str(path))
    names = {"normal": "sequential", "parallel": "parallel", "scaled_parallel": "scaled_parallel"}
    assert layout.placement == {"mlp": names[mlp], **({"attention": names[attn]} if attn else {})}
    assert (layout.n_layer, layout.d_model, layout.vocab_size, layout.downsample, layout.layer_norm) == \
        (2, D, V, factor, ln)
    assert layout.encoder == "resnet" and layout.encoder_out == 128

    def adapter(loc: str) -> AdapterConfig:
        return AdapterConfig(kind="bottleneck", placement=layout.placement[loc], locations=[loc],
                             downsample=layout.downsample, layer_norm=layout.layer_norm)
    ours = DodoSide(adapter("mlp"), adapter("attention") if attn else None)
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(0, V, (2, 5))
    assert torch.equal(ours(images, ids), theirs(images, ids))


def test_not_a_magma_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"module": {"encoder.layer.0.weight": torch.zeros(2)}}, path)
    with pytest.raises(ConfigError, match="tensor encoder.layer.0.weight is not in MAGMA's layout"):
        load_magma_checkpoint(str(path))


@torch.no_grad()
def test_their_checkpoint_loads_into_dodo_magma_model(tmp_path):
    """The same mapping into dodo's own MagmaModel, its towers built from local sources (any
    weights of the right shapes: the checkpoint replaces them all, strictly)."""
    from safetensors.torch import save_file

    from dodo.models.magma.config import ImageEncoderConfig, LMConfig, MagmaModelConfig
    from dodo.models.magma.model import MagmaModel

    theirs = TheirMagma("scaled_parallel", "normal", 4, True)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": theirs.their_state_dict()}, path)
    sd, layout = load_magma_checkpoint(str(path))
    _lm().save_pretrained(str(tmp_path / "gptj"))
    mc = model_config(SourceConfig(kind="random", arch="RN50x16", arch_kwargs=json.dumps(TINY_RN)))
    save_file({k: v.contiguous() for k, v in import_open_clip().model.CLIP(**mc).state_dict().items()},
              str(tmp_path / "rn.safetensors"))
    cfg = MagmaModelConfig(
        lm=LMConfig(arch="gptj", d_model=D, n_head=2, rotary_dim=8,
                    source=SourceConfig(kind="hf", path=str(tmp_path / "gptj"), dtype="float32")),
        image_encoder=ImageEncoderConfig(source=SourceConfig(
            kind="open_clip", path=str(tmp_path / "rn.safetensors"), arch="RN50x16", dtype="float32",
            arch_kwargs=json.dumps(TINY_RN))),
        adapter=AdapterConfig(kind="bottleneck", placement="scaled_parallel", locations=["mlp"],
                              downsample=layout.downsample, layer_norm=layout.layer_norm))
    model = MagmaModel(cfg, V, 0)
    # MAGMA v2-style mixes placements per location; dodo's one adapter config has one placement,
    # so the attention adapters (sequential) are added the way inject does it, as a second pass.
    inject_adapters(model.lm, AdapterConfig(kind="bottleneck", placement="sequential", locations=["attention"],
                                            downsample=layout.downsample, layer_norm=layout.layer_norm), D)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(0, V, (2, 5))
    got = model.lm(inputs_embeds=model.embed(images, ids)).logits
    assert torch.equal(got, theirs(images, ids))
