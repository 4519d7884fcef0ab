"""The weak family's keys of ``model:`` (``model.weak``): a timm ViT (DINO / MAE) with a frozen
text encoder, and what the run trains (torch-free: it runs at submit).

    model:
      family: weak
      weak:
        vision: {kind: timm, path: /models/dino_vitb16.pth, arch: vit_base_patch16_224.dino}
        text: {kind: hf, path: /models/clip-vit-base-patch16, tower: text}
        objective: mae_contrastive      # | reprogram | cross_modal
        mae: {mask_ratio: 0.75, decoder_dim: 512, decoder_layers: 8}
        replay: {enabled: true, source_layer: 3, target_layers: [6, 9]}

docs/methods.md "Weak language supervision" gives the equations and the defaults' sources.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import ConfigValueError, check
from dodo.config.preflight import MUST_EXIST
from dodo.models.config import ModelConfig
from dodo.models.sources.config import (SourceConfig, check_source, check_tokenizer_vocab, hf_vocab_size,
                                        tokenizer_size)

OBJECTIVES = ("mae_contrastive", "reprogram", "cross_modal")
# A tiny random DINO ViT (timm's own kwargs) for CPU runs when no checkpoint is given.
TINY_VIT = '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}'


def _tiny_vision() -> SourceConfig:
    return SourceConfig(kind="random", arch="vit_base_patch16_224.dino", arch_kwargs=TINY_VIT)


@dataclass
class MAEConfig:
    """MAE (He et al. 2022): ``mask_ratio`` of the patches dropped before the encoder, a light
    decoder (``decoder_layers`` timm blocks, ``decoder_dim`` wide) predicts their pixels, MSE on
    per-patch normalised pixels (``norm_pix``) of the masked patches. Paper: 0.75, 8 x 512."""

    mask_ratio: float = 0.75
    decoder_dim: int = 64
    decoder_layers: int = 1
    decoder_heads: int = 4
    norm_pix: bool = True

    def __post_init__(self) -> None:
        check(0 < self.mask_ratio < 1, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_layers", "decoder_heads"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.decoder_dim % self.decoder_heads == 0, "decoder_dim",
              f"must be divisible by decoder_heads={self.decoder_heads}")


@dataclass
class ReplayConfig:
    """Token replay (dodo's design; docs/methods.md): the tokens after block ``source_layer``
    are re-injected into the input of each later block of ``target_layers`` (empty: every later
    block) through LN -> down (``bottleneck``) -> GELU -> up -> tanh(gate) residual, gate 0 at init.
    ``tokens``: all (every position replays itself) or cls (the [CLS] token only, added to every
    position)."""

    enabled: bool = False
    source_layer: int = 0
    target_layers: list[int] = field(default_factory=list)
    tokens: Literal["all", "cls"] = "all"
    bottleneck: int = 16
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        check(self.source_layer >= 0, "source_layer", f"must be >= 0, got {self.source_layer}")
        check(all(t > self.source_layer for t in self.target_layers), "target_layers",
              f"must all be later than source_layer={self.source_layer}, got {self.target_layers}")
        check(self.bottleneck >= 1, "bottleneck", f"must be >= 1, got {self.bottleneck}")


@dataclass
class ReprogramConfig:
    """Adversarial reprogramming (Elsayed et al. 2019) and its label mapping; the cross-modal
    variant's token map. The frozen model's source labels are text classes: the frozen text
    encoder's embeddings of ``template`` filled with each of ``source_classes`` (a class list
    spec: ``clip_benchmark:<dataset>`` or a file), compared with the image's projected [CLS]."""

    inner_size: int = 16  # the target image is resized to this and placed in the canvas centre
    source_classes: str = "clip_benchmark:imagenet1k"
    template: str = "a photo of a {}."
    label_map: Literal["fixed", "learned"] = "fixed"  # fixed: source k -> target k mod n, averaged
    # cross_modal: the map from the text encoder's token embeddings to patch embeddings
    map: Literal["linear", "mlp"] = "linear"
    map_hidden: int = 128
    # A finished mae_contrastive run (its directory) whose trained adapters, projections and
    # temperature become part of the frozen source model; "" keeps them as model.init_seed built them.
    init_from: str = field(default="", metadata=MUST_EXIST)

    def __post_init__(self) -> None:
        check(self.inner_size > 0, "inner_size", f"must be > 0, got {self.inner_size}")
        check("{}" in self.template, "template", f"must contain {{}} for the class name, got {self.template!r}")
        check(self.map_hidden > 0, "map_hidden", f"must be > 0, got {self.map_hidden}")


@dataclass
class WeakConfig:
    # The vision encoder: timm (a DINO / MAE ViT checkpoint) or random (timm arch, random init).
    vision: SourceConfig = field(default_factory=_tiny_vision)
    # The frozen text encoder: hf (tower text: a CLIP text tower; encoder: a BERT) or random (a
    # tiny CLIP text tower of the sizes below, sized to the tokenizer).
    text: SourceConfig = field(default_factory=lambda: SourceConfig(kind="random", tower="text"))
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 32
    projection_dim: int = 64
    objective: Literal["mae_contrastive", "reprogram", "cross_modal"] = "mae_contrastive"
    mae_weight: float = 1.0
    contrastive_weight: float = 1.0
    init_temperature: float = 0.07
    # What the eval suites' image hook embeds (mae_contrastive): projected (image_proj([CLS]),
    # the joint space that retrieval / zero-shot need) or backbone (the ViT's final-normed [CLS],
    # DINO's kNN protocol; suites that also embed texts are refused with it).
    suite_embedding: Literal["projected", "backbone"] = "projected"
    mae: MAEConfig = field(default_factory=MAEConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    reprogram: ReprogramConfig = field(default_factory=ReprogramConfig)

    def __post_init__(self) -> None:
        check(self.vision.kind in ("timm", "random"), "vision.kind",
              f"is {self.vision.kind}; the weak family's vision encoder is a timm ViT: set kind timm "
              "(a DINO / MAE checkpoint) or random")
        check(self.vision.kind != "random" or bool(self.vision.arch), "vision.arch",
              "a random vision encoder needs a timm architecture name (e.g. vit_base_patch16_224.dino)")
        check(self.text.kind in ("hf", "random"), "text.kind",
              f"is {self.text.kind}; the frozen text encoder is a Hugging Face directory (hf) or random")
        check(self.text.kind != "hf" or self.text.tower in ("text", "encoder"), "text.tower",
              f"is {self.text.tower}; set text (a CLIP text tower) or encoder (a BERT)")
        for name in ("text_hidden", "text_layers", "text_heads", "max_text_len", "projection_dim"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.text_hidden % self.text_heads == 0, "text_hidden", f"must be divisible by text_heads={self.text_heads}")
        check(self.mae_weight >= 0 and self.contrastive_weight >= 0, "mae_weight", "loss weights must be >= 0")
        check(self.objective != "mae_contrastive" or self.mae_weight + self.contrastive_weight > 0,
              "mae_weight", "mae_weight and contrastive_weight are both 0: set one of them")
        check(self.init_temperature > 0, "init_temperature", f"must be > 0, got {self.init_temperature}")

    def vision_image_size(self) -> int | None:
        """The ViT's input size as far as it is known without torch (arch_kwargs / arch name)."""
        size = json.loads(self.vision.arch_kwargs).get("img_size")
        if isinstance(size, int):
            return size
        for part in self.vision.arch.split(".", 1)[0].split("_"):
            if part.isdigit():
                return int(part)
        return None


@dataclass
class WeakModelConfig(ModelConfig):
    """Weak language supervision of a vision encoder: timm ViT + frozen text encoder."""

    family: str = "weak"
    weak: WeakConfig = field(default_factory=WeakConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        w, a = self.weak, self.adapter
        check(a.kind != "film" or a.film.condition == "text", "adapter.film.condition",
              f"is {a.film.condition}; the weak family conditions FiLM on language: set "
              "model.adapter.film.condition=text")
        check(a.kind == "none" or w.objective == "mae_contrastive", "adapter.kind",
              f"is {a.kind}, but model.weak.objective={w.objective} keeps the model frozen (only the "
              "perturbation / token map trains): set model.adapter.kind=none")
        check(not w.reprogram.init_from or w.objective != "mae_contrastive", "weak.reprogram.init_from",
              "is for reprogramming runs (objective reprogram / cross_modal); a mae_contrastive run starts fresh")
        check(not w.replay.enabled or w.objective == "mae_contrastive", "weak.replay.enabled",
              f"token replay adapts the encoder, but model.weak.objective={w.objective} keeps it frozen")

    def frozen_base(self) -> dict[str, object]:
        keys = super().frozen_base()
        for tower in ("vision", "text"):
            keys.update({f"model.weak.{tower}.{k}": v for k, v in vars(getattr(self.weak, tower)).items()})
        return keys

    def init_adapter_runs(self) -> list[str]:
        """The mae_contrastive run a reprogramming run takes its frozen adapters and heads from."""
        w = self.weak
        return [w.reprogram.init_from] if w.reprogram.init_from and w.objective != "mae_contrastive" else []


def validate_job(job: object) -> None:
    """Submit time (torch-free): sources exist and name known architectures; the images fit the
    ViT; reprogramming runs have labelled data."""
    model, data = job.model, job.data  # type: ignore[attr-defined]
    w = model.weak
    for key, source in (("model.weak.vision", w.vision), ("model.weak.text", w.text)):
        check_source(source, key, paths=os.path.exists(source.path))  # missing: MUST_EXIST says so
    if w.text.kind == "hf" and os.path.isdir(w.text.path):
        n, rows = tokenizer_size(model.tokenizer), hf_vocab_size(w.text.path)
        if n is not None and rows is not None:
            check_tokenizer_vocab(n, rows)
    if w.suite_embedding == "backbone":
        texts = [s.kind for s in job.eval.suites if s.kind in ("retrieval", "zeroshot")]  # type: ignore[attr-defined]
        check(not texts, "model.weak.suite_embedding",
              f"is backbone (the ViT's [CLS], no text space), but eval.suites has {texts[0] if texts else ''}, "
              "which compares images with texts: set model.weak.suite_embedding=projected or drop that suite")
    if w.objective != "mae_contrastive" and w.reprogram.init_from and \
            os.path.isfile(os.path.join(w.reprogram.init_from, "config.yaml")):
        from dodo.config.loader import load_job
        other = load_job(os.path.join(w.reprogram.init_from, "config.yaml")).model
        ok = isinstance(other, WeakModelConfig) and other.weak.objective == "mae_contrastive"
        check(ok and not other.weak.replay.enabled, "model.weak.reprogram.init_from",
              f"{w.reprogram.init_from} is not a weak mae_contrastive run without token replay (the source "
              "model a reprogramming run freezes); name such a run directory")
    size = w.vision_image_size()
    if w.objective == "mae_contrastive" and size is not None:
        check(data.image_size == size, "data.image_size",
              f"is {data.image_size}, but the ViT (model.weak.vision) takes {size} px images; set "
              f"data.image_size={size} (and rebuild the cache at that size)")
    if w.objective != "mae_contrastive" and size is not None:
        check(w.reprogram.inner_size <= size, "model.weak.reprogram.inner_size",
              f"is {w.reprogram.inner_size}, larger than the ViT's {size} px canvas; lower it")
    n_source = 0
    if w.objective != "mae_contrastive":
        from dodo.eval.classnames import ClassListError, classnames
        try:
            n_source = len(classnames(w.reprogram.source_classes))
        except (ClassListError, OSError) as err:
            raise ConfigValueError("model.weak.reprogram.source_classes", str(err)) from None
    if w.objective != "mae_contrastive" and data.kind != "synthetic" and os.path.isdir(data.train_cache):
        from dodo.data.manifest import describe
        feeds = describe(data.train_cache).feeds()
        check(bool(feeds["labels"]), "data.train_cache",
              f"{data.train_cache} has no class labels, but model.weak.objective={w.objective} trains a "
              "classifier: use a labelled cache (class folders, CIFAR)")
        check(n_source >= feeds["num_classes"], "model.weak.reprogram.source_classes",
              f"has {n_source} classes, fewer than the {feeds['num_classes']} target classes of "
              f"{data.train_cache}: the many-to-one label map needs at least one source class per target")
        check(w.objective != "cross_modal" or bool(feeds["captions"]), "data.train_cache",
              f"{data.train_cache} has no captions, but model.weak.objective=cross_modal feeds the "
              "captions' tokens to the ViT: use a labelled cache with captions (webdataset with .cls)")
    check(w.objective == "mae_contrastive" or data.kind != "synthetic", "data.kind",
          f"is synthetic, but model.weak.objective={w.objective} needs labelled data: a class-folder or "
          "CIFAR cache (data.kind=hdf5, data.train_cache=...)")
