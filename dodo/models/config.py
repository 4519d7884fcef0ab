"""Model architecture config. Sizes live in configs/model/*.yaml and are found by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dodo.adapters.config import AdapterConfig
from dodo.config.errors import check
from dodo.moe.config import MoEConfig
from dodo.config.preflight import MUST_EXIST
from dodo.models.clip.config import ClipConfig
from dodo.models.vlmo.config import VlmoConfig


@dataclass
class LMConfig:
    """The frozen causal language model (GPT-2 / GPT-Neo / GPT-J family)."""

    arch: Literal["gpt2", "gpt_neo", "gptj"] = "gpt2"
    path: Optional[str] = field(default=None, metadata=MUST_EXIST)  # local weights; None: random init
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_positions: int = 64
    rotary_dim: int = 16  # gptj only
    # Std of a randomly initialised LM's weights (transformers' initializer_range). Its tied
    # output embedding bounds the logits, so a frozen random LM needs more than GPT-2's 0.02.
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "n_head", "n_positions"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        check(self.d_model % self.n_head == 0, "d_model",
              f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.arch == "gptj":  # rotary embeddings cover the first rotary_dim dims of each head
            head_dim = self.d_model // self.n_head
            check(0 < self.rotary_dim <= head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
                  f"must be even and in (0, d_model / n_head = {head_dim}], got {self.rotary_dim}")


@dataclass
class ImageEncoderConfig:
    """The image tower: a ViT (transformers ViTModel) or a CLIP vision tower."""

    arch: Literal["vit", "clip_vision"] = "vit"
    path: Optional[str] = field(default=None, metadata=MUST_EXIST)  # local weights; None: random init
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    n_layer: int = 2
    n_head: int = 4
    trainable: bool = False  # MAGMA's released configs train it with its own small lr
    lr: float = 2.0e-6  # used only when trainable

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden", "n_layer", "n_head"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.hidden % self.n_head == 0, "hidden",
              f"hidden={self.hidden} must be divisible by n_head={self.n_head}")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")


@dataclass
class ModelConfig:
    """A MAGMA-style prefix LM: image encoder -> prefix projection -> frozen LM with adapters."""

    family: Literal["magma", "clip", "vlmo"] = "magma"
    init_seed: int = 0  # frozen random-init weights are rebuilt from this seed on every rank
    # builtin:synthetic, or a local tokenizer directory / tokenizer.json
    tokenizer: str = field(default="builtin:synthetic", metadata=MUST_EXIST)
    lm: LMConfig = field(default_factory=LMConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    prefix_dropout: float = 0.1
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts adapters (dodo/moe)
    clip: ClipConfig = field(default_factory=ClipConfig)  # family: clip (dual encoder)
    vlmo: VlmoConfig = field(default_factory=VlmoConfig)  # family: vlmo (multiway transformer)

    def __post_init__(self) -> None:
        check(0.0 <= self.prefix_dropout < 1.0, "prefix_dropout",
              f"must be in [0, 1), got {self.prefix_dropout}")
        check(not self.moe.enabled or self.family == "magma", "moe.num_experts",
              f"MoE adapters go into the MAGMA LM; model.family={self.family} has none: "
              "set model.moe.num_experts=0")
        check(not self.moe.enabled or self.adapter.kind == "bottleneck", "adapter.kind",
              f"MoE adapters replace the bottleneck adapters of model.moe.layers, but model.adapter.kind="
              f"{self.adapter.kind} places none; set model.adapter.kind=bottleneck (its placement and "
              "locations are used; model.moe.expert picks the expert type) or model.moe.num_experts=0")
