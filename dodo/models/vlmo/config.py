"""VLMo multiway transformer config."""

from __future__ import annotations

from dataclasses import dataclass

from dodo.config.errors import check


@dataclass
class VlmoConfig:
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    vl_layers: int = 1  # the top layers route every token to the VL expert (base: 2 of 12)
    mlp_ratio: int = 4
    max_text_len: int = 32
    layer_scale_init: float = 0.1
    init_temperature: float = 0.07
    contrastive_weight: float = 1.0  # ITC (dual encoder)
    itm_weight: float = 1.0  # ITM with hard negatives (fusion encoder)
    mlm_weight: float = 0.0  # MLM on the fused image-text input
    mlm_prob: float = 0.15
    frozen: bool = False  # freeze the multiway transformer and train adapters only

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden", "layers", "heads", "mlp_ratio", "max_text_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.hidden % self.heads == 0, "hidden", f"must be divisible by heads={self.heads}")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        check(0 <= self.vl_layers <= self.layers, "vl_layers",
              f"must be in [0, layers={self.layers}], got {self.vl_layers}")
        for name in ("contrastive_weight", "itm_weight", "mlm_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(0 < self.mlm_prob < 1, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
