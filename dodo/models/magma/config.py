"""MAGMA's keys of ``model:``: the frozen LM, the image encoder and the prefix projection
(``model.image_prefix``: MAGMA's Linear + LayerNorm, or LiMBeR's single linear map)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dodo.config.errors import check
from dodo.config.preflight import MUST_EXIST
from dodo.models.config import ModelConfig
from dodo.models.sources.config import (SourceConfig, check_source, check_tokenizer_vocab, hf_vocab_size,
                                        tokenizer_size)


@dataclass
class LMConfig:
    """The frozen causal language model (GPT-2 / GPT-Neo / GPT-J family)."""

    arch: Literal["gpt2", "gpt_neo", "gptj"] = "gpt2"
    path: Optional[str] = field(default=None, metadata=MUST_EXIST)  # local weights; None: random init
    # kind hf: the LM from a model directory, in the dtype per device (docs/models.md); random: path / sizes
    source: SourceConfig = field(default_factory=SourceConfig)
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
    # open_clip (RN50x16 grid...) / timm (DINO, MAE) / hf tower (docs/models.md); random: arch / sizes
    source: SourceConfig = field(default_factory=SourceConfig)
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
class ImagePrefixConfig:
    """How image features become the LM's input embeddings (the trainable map between them).

    magma   per image token: Linear -> Dropout(prefix_dropout) -> LayerNorm (MAGMA's projection)
    linear  one nn.Linear and nothing else (LiMBeR, Merullo et al. 2023): with ``tokens: 0`` each
            image token is mapped to one soft prompt; with ``tokens: k`` the mean image feature
            (B, enc) is mapped to k soft prompts (B, k, d_model) by a Linear enc -> k * d_model.
    """

    kind: Literal["magma", "linear"] = "magma"
    tokens: int = 0

    def __post_init__(self) -> None:
        check(self.tokens >= 0, "tokens", f"must be >= 0 (0 = one prompt per image token), got {self.tokens}")
        check(self.tokens == 0 or self.kind == "linear", "tokens",
              "k pooled soft prompts are the linear (LiMBeR) map's option; set kind: linear or tokens: 0")


@dataclass
class MagmaModelConfig(ModelConfig):
    """A MAGMA-style prefix LM: image encoder -> prefix projection -> frozen LM with adapters."""

    family: str = "magma"
    lm: LMConfig = field(default_factory=LMConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    image_prefix: ImagePrefixConfig = field(default_factory=ImagePrefixConfig)
    prefix_dropout: float = 0.1  # image_prefix.kind magma only

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.prefix_dropout < 1.0, "prefix_dropout",
              f"must be in [0, 1), got {self.prefix_dropout}")
        check(self.adapter.kind != "film" or self.adapter.film.condition in ("image", "task"),
              "adapter.film.condition", f"is {self.adapter.film.condition}, which MAGMA does not build (its "
              "FiLM is conditioned on the image or a task id; language conditioning is the weak family's): "
              "set model.adapter.film.condition=image or task")
        if self.moe.enabled:  # the blocks that get MoE adapters must exist and hold a bottleneck adapter
            n = self.lm.n_layer
            for i in self.moe.layers:
                check(-n <= i < n, "moe.layers",
                      f"has {i}, but the LM has model.lm.n_layer={n} blocks; use indices in [-{n}, {n - 1}]")
            if self.adapter.layers:
                dense = {i % n for i in self.adapter.layers if -n <= i < n}
                outside = sorted({i % n for i in self.moe.layers or range(n)} - dense)
                check(not outside, "moe.layers",
                      f"includes LM block(s) {outside}, which have no bottleneck adapter: model.adapter.layers="
                      f"{self.adapter.layers} leaves them out; add them there or narrow model.moe.layers")

    def frozen_base(self) -> dict[str, object]:
        keys = super().frozen_base()
        for section in ("lm", "image_encoder"):
            for name, value in vars(getattr(self, section)).items():
                if name not in ("trainable", "lr"):
                    keys[f"model.{section}.{name}"] = value
        return keys


def check_sources(job: object) -> None:
    """Submit time (torch-free): the configured weight sources exist, have their format and name
    an architecture the library knows (FamilySpec.validate)."""
    import os
    model = job.model  # type: ignore[attr-defined]
    for key, source in (("model.lm.source", model.lm.source), ("model.image_encoder.source", model.image_encoder.source)):
        check_source(source, key, paths=os.path.exists(source.path))  # missing: MUST_EXIST says so
    lm = model.lm.source
    if lm.kind == "hf" and os.path.isdir(lm.path):  # the tokenizer must fit the LM's embedding
        n, rows = tokenizer_size(model.tokenizer), hf_vocab_size(lm.path)
        if n is not None and rows is not None:
            check_tokenizer_vocab(n, rows)
