"""VLMo's keys of ``model:``: ``model.vlmo``, the multiway transformer and its losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from dodo.config.errors import check
from dodo.models.config import ModelConfig


@dataclass
class VlmoConfig:
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    # Blocks vlffn_start.. (0-based) have a vision-language FFN expert that takes every token of
    # an image-text input (base: 10 of 12; large: 21 of 24); = layers: no VL expert (the
    # fusion encoder keeps routing by modality throughout).
    vlffn_start: int = 3
    mlp_ratio: int = 4
    max_text_len: int = 32  # caption tokens, without the text [CLS] the model prepends
    layer_scale_init: float = 0.1  # LayerScale gamma of both residual branches
    dropout: float = 0.0
    init_temperature: float = 0.07  # ITC: learnable, logit scale = log(1 / T)
    contrastive_weight: float = 1.0  # ITC (dual encoder)
    itm_weight: float = 1.0  # ITM with hard negatives from the ITC similarities (fusion encoder)
    mlm_weight: float = 0.0  # MLM on the fused image-text input (0: off)
    mlm_prob: float = 0.15
    rerank_k: int = 8  # evaluation: re-rank each query's ITC top-k by the ITM score (0: off)
    frozen: bool = False  # freeze the multiway transformer and train adapters (+ heads) only

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden", "layers", "heads", "mlp_ratio", "max_text_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.hidden % self.heads == 0, "hidden", f"must be divisible by heads={self.heads}")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        check(0 <= self.vlffn_start <= self.layers, "vlffn_start",
              f"must be in [0, layers={self.layers}] (= layers: no VL expert), got {self.vlffn_start}")
        check(self.layer_scale_init > 0, "layer_scale_init", f"must be > 0, got {self.layer_scale_init}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.init_temperature > 0, "init_temperature", f"must be > 0, got {self.init_temperature}")
        for name in ("contrastive_weight", "itm_weight", "mlm_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.contrastive_weight + self.itm_weight + self.mlm_weight > 0, "contrastive_weight",
              "all loss weights are 0: set contrastive_weight, itm_weight or mlm_weight")
        check(0 < self.mlm_prob < 1, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        check(self.rerank_k >= 0, "rerank_k", f"must be >= 0, got {self.rerank_k}")


# Adapter kinds the multiway transformer cannot take, and why (refused at submit).
REFUSED_ADAPTERS = {
    "prefix": "prefix tuning needs transformers' attention interface, which VLMo's own attention lacks",
    "mam": "MAM includes prefix tuning, which needs transformers' attention interface",
    "film": "FiLM needs a condition, which VLMo does not provide",
}


@dataclass
class VlmoModelConfig(ModelConfig):
    """A VLMo multiway transformer: dual encoder (ITC) and fusion encoder (ITM, MLM)."""

    family: str = "vlmo"
    vlmo: VlmoConfig = field(default_factory=VlmoConfig)


def validate_job(job) -> None:  # JobConfig -> None (ConfigValueError with the full key path)
    """The images and captions the data gives must fit the model's positions."""
    v, d = job.model.vlmo, job.data
    check(d.image_size == v.image_size, "data.image_size",
          f"is {d.image_size}, but model.vlmo.image_size={v.image_size}: the model has positions for "
          f"{v.image_size} px images; set both to the same value")
    check(d.max_caption_tokens <= v.max_text_len, "data.max_caption_tokens",
          f"is {d.max_caption_tokens}, more than model.vlmo.max_text_len={v.max_text_len} text positions; "
          "raise model.vlmo.max_text_len or lower data.max_caption_tokens")
