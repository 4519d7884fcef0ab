"""CLIP's keys of ``model:``: ``model.clip``, the two towers (a transformers CLIPConfig) and the objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dodo.config.errors import check
from dodo.config.preflight import MUST_EXIST
from dodo.models.config import ModelConfig


# The hard-sample domain adapter's keys (model.clip.hard_samples): a memory bank of each training
# pair's difficulty weights its loss and drives a sampler that draws hard pairs more often
# (dodo/models/clip/hard_bank.py, dodo/data/hard_sampler.py, docs/methods.md).
@dataclass
class HardSamplesConfig:
    enabled: bool = False
    # loss: the pair's own InfoNCE term ((image->text + text->image) / 2); rank: how many
    # negatives outscore its positive (mean of both directions; 0 = retrieved first).
    difficulty: Literal["loss", "rank"] = "loss"
    # Bank update when a pair is seen again: d <- momentum * d + (1 - momentum) * new (first
    # sight: d <- new). 0 keeps only the latest value.
    momentum: float = 0.5
    # weight = clip(((d + eps) / (mean d over seen pairs + eps)) ** power, 1 / max_weight, max_weight);
    # a pair not seen yet weighs 1.
    power: float = 1.0
    max_weight: float = 5.0
    eps: float = 1.0e-3
    loss_weights: bool = True  # instance weights (normalised to mean 1 in the micro-batch) in the loss
    sampling: bool = True  # epochs >= 1 draw pairs with probability proportional to their weight
    # The weights of epoch e are frozen this many optimizer steps before it starts (at most one
    # epoch before), so the order does not depend on how far the data loader prefetches; it
    # must exceed data.num_workers x data.prefetch_factor (checked when the run starts).
    snapshot_lag: int = 32

    def __post_init__(self) -> None:
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.power >= 0, "power", f"must be >= 0, got {self.power}")
        check(self.max_weight >= 1, "max_weight", f"must be >= 1, got {self.max_weight}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.snapshot_lag >= 1, "snapshot_lag", f"must be >= 1, got {self.snapshot_lag}")
        check(not self.enabled or self.loss_weights or self.sampling, "loss_weights",
              "and sampling are both false: the bank would change nothing; enable one")


@dataclass
class ClipConfig:
    path: Optional[str] = field(default=None, metadata=MUST_EXIST)  # local CLIPModel; None: random init
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_text_len: int = 32
    projection_dim: int = 64
    # Besides the adapters: projections (the two linear heads), temperature (logit scale),
    # all (full fine-tuning; the baseline).
    trainable: list[Literal["projections", "temperature", "all"]] = field(default_factory=lambda: ["temperature"])
    loss: Literal["infonce", "mpm_nce"] = "infonce"
    init_temperature: float = 0.07  # InfoNCE: learnable, logit_scale = log(1 / T)
    mpm_eps: float = 0.1  # MPM-NCE label smoothing (the paper's value was not found)
    mpm_delta: float = 0.05  # margin added to the negatives
    mpm_tau: float = 0.01  # fixed temperature
    contrastive_weight: float = 1.0
    mim_weight: float = 0.0  # masked image modelling through a light decoder (0: off)
    mim_mask_ratio: float = 0.6
    mlm_weight: float = 0.0  # masked language modelling on the text tower (0: off)
    mlm_prob: float = 0.15
    # What the run trains (dodo/models/clip/task.py build_task): contrastive (the weighted sum
    # above), or a pretext task alone, scored on held-out data: mim (masked image modelling on
    # the vision tower; L1 on masked patches) or mlm (masked language modelling on the text
    # tower; accuracy). mim / mlm ignore the *_weight keys.
    objective: Literal["contrastive", "mim", "mlm"] = "contrastive"
    # Earlier runs (run directories) whose adapters this run starts from, frozen: each run's
    # model.adapter is injected first and loaded from its newest checkpoint; then this run's
    # own model.adapter is added on top and trained (masked adapters: docs/methods.md).
    init_adapters: list[str] = field(default_factory=list, metadata=MUST_EXIST)
    # The text side of contrastive training: the data's captions, or class_templates
    # (classification fine-tuning on a labelled cache: each image's class name in a template,
    # same-class pairs positive; dodo/models/clip/class_text.py, refused at submit without labels).
    text_source: Literal["captions", "class_templates"] = "captions"
    class_names: str = ""  # class_templates: "" = the cache manifest's; clip_benchmark:<dataset> or a file
    class_templates: str = ""  # class_templates: "" = clip_benchmark's for the cache's dataset; or a file
    # The hard-sample domain adapter: a difficulty bank weighting the loss and the sampler
    # (HardSamplesConfig above; docs/methods.md).
    hard_samples: HardSamplesConfig = field(default_factory=HardSamplesConfig)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                     "text_hidden", "text_layers", "text_heads", "max_text_len", "projection_dim"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        check(self.vision_hidden % self.vision_heads == 0, "vision_hidden",
              f"must be divisible by vision_heads={self.vision_heads}")
        check(self.text_hidden % self.text_heads == 0, "text_hidden",
              f"must be divisible by text_heads={self.text_heads}")
        check(self.init_temperature > 0, "init_temperature", f"must be > 0, got {self.init_temperature}")
        check(0 <= self.mpm_eps < 1, "mpm_eps", f"must be in [0, 1), got {self.mpm_eps}")
        check(self.mpm_tau > 0, "mpm_tau", f"must be > 0, got {self.mpm_tau}")
        check(0 < self.mim_mask_ratio < 1, "mim_mask_ratio", f"must be in (0, 1), got {self.mim_mask_ratio}")
        check(0 < self.mlm_prob < 1, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        for name in ("contrastive_weight", "mim_weight", "mlm_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.contrastive_weight + self.mim_weight + self.mlm_weight > 0, "contrastive_weight",
              "all loss weights are 0: set contrastive_weight, mim_weight or mlm_weight")
        check(not self.hard_samples.enabled or (self.objective == "contrastive" and self.loss == "infonce"),
              "hard_samples.enabled", f"needs per-pair InfoNCE losses, but objective={self.objective}, "
              f"loss={self.loss}; set model.clip.objective=contrastive and model.clip.loss=infonce")


# The tower-defining CLIP keys; objective, loss weights, trainable heads may differ between
# runs whose adapters are combined (model.clip.init_adapters).
CLIP_BASE_KEYS = ("path", "image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                  "text_hidden", "text_layers", "text_heads", "max_text_len", "projection_dim")


@dataclass
class ClipModelConfig(ModelConfig):
    """A CLIP dual encoder (transformers CLIPModel) with adapters in both towers."""

    family: str = "clip"
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.adapter.kind != "film" or self.adapter.film.condition == "task", "adapter.film.condition",
              f"is {self.adapter.film.condition}, which would make one tower depend on the other's input; a "
              "dual encoder cannot do that: set model.adapter.film.condition=task")

    def frozen_base(self) -> dict[str, object]:
        keys = super().frozen_base()
        keys.update({f"model.clip.{k}": getattr(self.clip, k) for k in CLIP_BASE_KEYS})
        return keys

    def init_adapter_runs(self) -> list[str]:
        return list(self.clip.init_adapters)


# What each pretext objective reads from a batch, and the cache that gives it (docs/data.md).
_PRETEXT_NEEDS = {"mim": ("image", "images", "an image cache, e.g. class folders: "
                                             "`dodo data cache ROOT --from folder`"),
                  "mlm": ("text", "captions or texts", "a text cache: `dodo data cache CORPUS --from text "
                                                       "--block 64 --tokenizer TOK`")}


def validate_job(job) -> None:  # JobConfig -> None (ConfigValueError with the full key path)
    """A masked pretext stage refuses a cache without its modality: MIM on a text-only cache (no
    images), MLM on an image-only one (no texts). Reads the ``modality`` field of manifest.json
    itself (json only: config-level code may not import dodo.data, STYLE.md's layer rule); a cache
    not built yet, or a manifest that does not parse, is left to the cache checks of `dodo submit`."""
    from dodo.models.clip.class_text import check_text_source
    check_text_source(job)  # text_source=class_templates needs a labelled cache
    objective, d = job.model.clip.objective, job.data
    if objective not in _PRETEXT_NEEDS or d.kind == "synthetic":
        return
    import json
    from pathlib import Path

    needed, what, fix = _PRETEXT_NEEDS[objective]
    lacking = "text" if needed == "image" else "image"  # the unimodal cache that cannot feed it
    for key in ("train_cache", "eval_cache"):
        path = getattr(d, key)
        manifest = Path(path).expanduser() / "manifest.json"
        if not path or not manifest.is_file():
            continue
        try:
            modality = json.loads(manifest.read_text()).get("modality", "image_text")  # older: image_text
        except (OSError, ValueError, AttributeError):
            continue  # a damaged manifest: named by the cache checks
        article = "an" if lacking == "image" else "a"
        check(modality != lacking, f"data.{key}",
              f"{path} is {article} {lacking}-only cache (manifest modality {lacking!r}), but "
              f"model.clip.objective={objective} needs {what}; point data.{key} at {fix}")


def default_suites(job) -> tuple[str, ...]:
    """Suites measured by default on real data: retrieval, except for a masked pretext stage
    (its held-out metric is eval.mim_l1 / eval.mlm_accuracy; it may train on a unimodal cache)."""
    return ("retrieval",) if job.model.clip.objective == "contrastive" else ()
