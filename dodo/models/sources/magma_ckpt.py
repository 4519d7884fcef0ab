"""Aleph-Alpha MAGMA's released checkpoints (mp_rank_00_model_states.pt: {"module": state dict})
in dodo's module names.

Their layout, read from their public code (magma/magma.py, image_prefix.py, image_encoders.py,
adapters.py; the LM is GPTNeoForCausalLM of the finetuneanon transformers fork with jax=True,
which is GPT-J: one ln_1, attention and MLP in parallel, no out_proj bias, lm_head with bias):

  image_prefix.enc.<visual>            OpenAI CLIP RN50x16 visual, attnpool replaced by a reshape
  image_prefix.proj / image_prefix.ln  Linear(3072 -> 4096) / LayerNorm(4096)
  lm.transformer.wte / ln_f, lm.lm_head
  lm.transformer.h.<i>.ln_1
  lm.transformer.h.<i>.attn.attention.{q,k,v,out}_proj   (+ buffers bias, masked_bias, scale_attn, sin, cos)
  lm.transformer.h.<i>.mlp.{c_fc,c_proj}
  adapters wrap the sub-layer (Adapter.adapter = Sequential([LayerNorm,] Linear, ReLU, Linear)):
    mlp "normal":        mlp.0.<mlp>          mlp.1.adapter.<j>
    mlp (scaled_)parallel: mlp.module.<mlp>   mlp.adapter.<j>   [mlp.adapter_scale]
    attn "normal":       attn.attn_block.<attn>  attn.adapter.<j>
    attn (scaled_)parallel: attn.module.<attn>   attn.adapter.<j>   [attn.adapter_scale]
  word_embedding.*, transformer.*      aliases of lm.transformer.wte / lm.transformer.h (skipped)

dodo's: image_encoder.net.visual.<visual> (an open_clip OpenClipGrid), prefix.0 / prefix.2,
lm.* as Hugging Face GPTJForCausalLM, and dodo's AdaptedSublayer (base / adapter.{norm,down,up} /
scale) in the same places; MAGMA's normal / parallel / scaled_parallel are dodo's
sequential / parallel (scaling 1) / scaled_parallel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from dodo.config.errors import ConfigError

_BUFFERS = ("bias", "masked_bias", "scale_attn", "sin", "cos")  # attention buffers of the fork
_INNER = {"attention.q_proj": "q_proj", "attention.k_proj": "k_proj", "attention.v_proj": "v_proj",
          "attention.out_proj": "out_proj", "c_fc": "fc_in", "c_proj": "fc_out"}
_BLOCK = re.compile(r"^lm\.transformer\.h\.(\d+)\.(attn|mlp|ln_1|ln_2)\.?(.*)$")


@dataclass
class MagmaLayout:
    """What the checkpoint holds, read from its names and shapes (dodo config values)."""

    n_layer: int = 0
    d_model: int = 0
    vocab_size: int = 0
    encoder_out: int = 0  # image_prefix.proj in-features (RN50x16: 3072)
    placement: dict[str, str] = field(default_factory=dict)  # "mlp" / "attention" -> dodo placement
    downsample: int = 0
    layer_norm: bool = False
    encoder: str = ""  # "resnet" | "vit"


def _adapter_part(j: int, layer_norm: bool) -> Optional[str]:
    """Index inside Adapter.adapter (Sequential) -> dodo BottleneckAdapter child; None: ReLU."""
    order = ["norm", "down", None, "up"] if layer_norm else ["down", None, "up"]
    return order[j] if j < len(order) else None


def map_magma_state_dict(sd: dict[str, torch.Tensor], encoder_prefix: str = "image_encoder.net.visual.",
                         path: str = "checkpoint") -> tuple[dict[str, torch.Tensor], MagmaLayout]:
    """(dodo-named state dict, layout). Unknown names are an error naming the first one."""
    layout = MagmaLayout()
    out: dict[str, torch.Tensor] = {}
    # Adapter Sequential: a 1-D tensor at index 0 is a LayerNorm (add_layernorm=True).
    first = [v for k, v in sd.items() if re.search(r"\.adapter\.0\.weight$", k)]
    layout.layer_norm = bool(first) and first[0].dim() == 1
    for name, t in sd.items():
        if name.startswith(("word_embedding.", "transformer.")):
            continue  # aliases registered by their MAGMA class; the lm.* copies are used
        if name.startswith("image_prefix.enc."):
            rest = name[len("image_prefix.enc."):]
            if rest.startswith("attnpool."):
                continue  # MAGMA does not use the attention pool
            layout.encoder = layout.encoder or ("resnet" if rest.startswith("layer") else "")
            out[encoder_prefix + rest] = t
            continue
        if name in ("image_prefix.proj.weight", "image_prefix.proj.bias"):
            out["prefix.0." + name.rsplit(".", 1)[1]] = t
            layout.encoder_out = t.shape[-1] if t.dim() == 2 else layout.encoder_out
            continue
        if name in ("image_prefix.ln.weight", "image_prefix.ln.bias"):
            out["prefix.2." + name.rsplit(".", 1)[1]] = t
            continue
        if name in ("lm.transformer.wte.weight", "lm.transformer.ln_f.weight", "lm.transformer.ln_f.bias",
                    "lm.lm_head.weight", "lm.lm_head.bias"):
            out[name] = t
            if name == "lm.transformer.wte.weight":
                layout.vocab_size, layout.d_model = t.shape
            continue
        m = _BLOCK.match(name)
        if not m:
            raise ConfigError(f"{path}: tensor {name} is not in MAGMA's layout (image_prefix.*, lm.*); "
                              "is this a MAGMA checkpoint?")
        i, sub, rest = int(m.group(1)), m.group(2), m.group(3)
        layout.n_layer = max(layout.n_layer, i + 1)
        head = f"lm.transformer.h.{i}."
        if sub in ("ln_1", "ln_2"):
            if sub == "ln_2":
                raise ConfigError(f"{path}: tensor {name}: a GPT-Neo block with ln_2 is not MAGMA's GPT-J "
                                  "(jax=True) block; dodo maps GPT-J checkpoints only")
            out[f"{head}ln_1.{rest}"] = t
            continue
        location = "attention" if sub == "attn" else "mlp"
        wrap = re.match(r"^(0|module|attn_block)\.(.+)$", rest)
        if wrap:  # the wrapped sub-layer of an adapter
            placement = "sequential" if wrap.group(1) in ("0", "attn_block") else "parallel"
            if layout.placement.get(location) != "scaled_parallel":
                layout.placement[location] = placement
            inner = wrap.group(2)
            prefix = f"{head}{sub}.base."
        elif rest == "adapter_scale":
            layout.placement[location] = "scaled_parallel"
            out[f"{head}{sub}.scale"] = t.reshape(1)
            continue
        elif (a := re.match(r"^(?:1\.)?adapter\.(\d+)\.(weight|bias)$", rest)):
            part = _adapter_part(int(a.group(1)), layout.layer_norm)
            if part is None:
                raise ConfigError(f"{path}: tensor {name} is not a Linear/LayerNorm of a MAGMA adapter")
            out[f"{head}{sub}.adapter.{part}.{a.group(2)}"] = t
            if part == "down" and a.group(2) == "weight":
                layout.downsample = t.shape[1] // t.shape[0]
            continue
        else:
            inner, prefix = rest, f"{head}{sub}."
        stem, _, kind = inner.rpartition(".")
        if stem == "attention" and kind in _BUFFERS:
            continue  # causal mask / rotary tables: buffers dodo's GPT-J recomputes
        if stem not in _INNER:
            raise ConfigError(f"{path}: tensor {name} is not in MAGMA's GPT-J block layout")
        out[f"{prefix}{_INNER[stem]}.{kind}"] = t
    if not layout.n_layer or "prefix.0.weight" not in out:
        raise ConfigError(f"{path} has no lm.transformer.h.* or image_prefix.proj tensors: not a MAGMA checkpoint")
    return out, layout


def load_magma_checkpoint(path: str, encoder_prefix: str = "image_encoder.net.visual.",
                          key: str = "model.init_checkpoint") -> tuple[dict[str, torch.Tensor], MagmaLayout]:
    """Read their file ({"module": sd} as DeepSpeed saved it, or a bare state dict) and map it."""
    from dodo.models.sources.load import read_checkpoint
    return map_magma_state_dict(read_checkpoint(path, key), encoder_prefix, path)
