"""Adapter config (bottleneck adapters for now; the method-zoo issue adds the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import check


@dataclass
class AdapterConfig:
    """Bottleneck adapters inserted into the LM.

    ``placement``: ``sequential`` (x + adapter(f(x))), ``parallel`` (f(x) + adapter(x)) or
    ``scaled_parallel`` (f(x) + s * adapter(x), s learned, init 1), as in MAGMA.
    """

    kind: Literal["none", "bottleneck"] = "bottleneck"
    placement: Literal["sequential", "parallel", "scaled_parallel"] = "sequential"
    locations: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["mlp"])
    downsample: int = 4  # hidden = d_model // downsample
    activation: Literal["relu", "gelu", "silu"] = "relu"
    layer_norm: bool = False  # pre-LayerNorm inside the adapter
    init_std: float = 1.0e-3  # N(0, init_std) clamped to +-2*init_std
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check(self.downsample >= 1, "downsample", f"must be >= 1, got {self.downsample}")
        check(len(self.locations) > 0 or self.kind == "none", "locations",
              "name at least one of: attention, mlp")
        check(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
