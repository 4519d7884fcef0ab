"""Adapter config: which adapter (``kind``), where it goes, and its per-kind settings.

Where (every kind): ``towers`` (lm / vision / text / fusion; empty = every tower the model
has), ``layers`` (block indices, negative counts from the top; empty = every layer),
``locations`` (attention and/or mlp sub-layers) and ``targets`` (extra regular expressions
that the full module name must match, e.g. ``"vision_model\\.encoder\\.layers\\.(1|3)\\."``).

The bottleneck fields stay at the top level (``placement``, ``downsample``, ...) so the
foundation's job files keep working; the other kinds have their own sub-section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import check

ADAPTER_KINDS = ("none", "bottleneck", "lora", "prefix", "mam", "film", "r_adapter")


@dataclass
class LoRAConfig:
    """PEFT-style LoRA: y = W x + (alpha / r) B A dropout(x); A Kaiming-uniform, B zero."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    # Linear (or GPT-2 Conv1D) modules whose name ends with one of these, inside the selected
    # blocks. CLIP / VLMo: q_proj k_proj v_proj out_proj fc1 fc2; GPT-2: c_attn c_proj c_fc.
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(len(self.targets) > 0, "targets", "name at least one module, e.g. [q_proj, v_proj]")


@dataclass
class PrefixConfig:
    """Prefix tuning: ``length`` learned key/value vectors per attention layer, produced from a
    learned embedding by an MLP (d -> bottleneck -> 2 d, tanh) as in Li & Liang / AdapterHub."""

    length: int = 30
    bottleneck: int = 512

    def __post_init__(self) -> None:
        check(self.length >= 1, "length", f"must be >= 1, got {self.length}")
        check(self.bottleneck >= 1, "bottleneck", f"must be >= 1, got {self.bottleneck}")


@dataclass
class FiLMConfig:
    """FiLM: h <- (1 + gamma(c)) * h + beta(c), gamma and beta linear in the condition c and
    zero-initialised (identity at the start). ``condition``: ``image`` (the image's pooled
    feature; MAGMA's LM), ``task`` (a learned embedding per task id) or ``text`` (language: a
    frozen text encoder's L2-normalised embedding of ``prompt``, and, with ``caption``, of each
    sample's caption where the model has one; the weak family)."""

    condition: Literal["image", "task", "text"] = "task"
    num_tasks: int = 1
    task_dim: int = 32
    prompt: str = "a photo"  # text: the fixed condition (every image-only pass)
    caption: bool = False  # text: condition on the sample's own caption where one is given

    def __post_init__(self) -> None:
        check(self.num_tasks >= 1, "num_tasks", f"must be >= 1, got {self.num_tasks}")
        check(self.task_dim >= 1, "task_dim", f"must be >= 1, got {self.task_dim}")


@dataclass
class RAdapterConfig:
    """R-Adapter (arXiv 2408.05749): h = X + s X W_adp after attention out and FFN out."""

    rank: int = 0  # 0: full-rank W_adp (d x d, init 0); r > 0: B A with B Xavier, A zero
    scale_init: float = 0.1  # the trainable scale s on the branch
    drop_prob: float = 0.2  # adapter dropping in training, kept branches scaled by 1 / (1 - p)
    ema: bool = True  # evaluate with an exponential moving average of the adapter weights
    ema_momentum: float = 0.999
    # The average behind ``ema``: ema (exponential, ema_momentum) or bma (the uniform running mean
    # of the weights of every optimizer step from bma_start on; docs/methods.md R-Adapter).
    ema_kind: Literal["ema", "bma"] = "ema"
    bma_start: int = 1  # bma: the first optimizer step (1-based) whose weights enter the mean
    alpha: float = 1.0  # re-scaling at evaluation: W_org (alpha W~_adp + I); paper 0.5 / 0.8 / 0.4

    def __post_init__(self) -> None:
        check(self.rank >= 0, "rank", f"must be >= 0 (0 = full rank), got {self.rank}")
        check(0.0 <= self.drop_prob < 1.0, "drop_prob", f"must be in [0, 1), got {self.drop_prob}")
        check(0.0 <= self.ema_momentum < 1.0, "ema_momentum", f"must be in [0, 1), got {self.ema_momentum}")
        check(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        check(self.bma_start >= 1, "bma_start", f"must be >= 1 (a 1-based optimizer step), got {self.bma_start}")


@dataclass
class AdapterConfig:
    """Adapters inserted into the frozen model.

    ``kind``: none | bottleneck | lora | prefix | mam (prefix + parallel bottleneck on the
    MLP) | film | r_adapter. Bottleneck ``placement``: ``sequential`` (x + adapter(f(x));
    Houlsby with locations [attention, mlp], Pfeiffer with [mlp]), ``parallel``
    (f(x) + scaling * adapter(x)) or ``scaled_parallel`` (f(x) + s * adapter(x), s learned,
    init ``scaling``), as in MAGMA.
    """

    kind: Literal["none", "bottleneck", "lora", "prefix", "mam", "film", "r_adapter"] = "bottleneck"
    placement: Literal["sequential", "parallel", "scaled_parallel"] = "sequential"
    locations: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["mlp"])
    towers: list[Literal["lm", "vision", "text", "fusion"]] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    downsample: int = 4  # hidden = d_model // downsample
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    layer_norm: bool = False  # pre-LayerNorm inside the adapter
    init_std: float = 1.0e-3  # N(0, init_std) clamped to +-2*init_std
    dropout: float = 0.0
    scaling: float = 1.0  # parallel: fixed factor; scaled_parallel: init of the learned s
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    film: FiLMConfig = field(default_factory=FiLMConfig)
    r_adapter: RAdapterConfig = field(default_factory=RAdapterConfig)

    def __post_init__(self) -> None:
        check(self.downsample >= 1, "downsample", f"must be >= 1, got {self.downsample}")
        check(len(self.locations) > 0 or self.kind == "none", "locations",
              "name at least one of: attention, mlp")
        check(self.init_std >= 0, "init_std", f"must be >= 0, got {self.init_std}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.kind != "mam" or self.placement != "sequential", "placement",
              "is sequential, but kind=mam pairs prefix tuning with a parallel adapter; set "
              "model.adapter.placement to parallel or scaled_parallel")
        for i, pattern in enumerate(self.targets):
            import re
            try:
                re.compile(pattern)
            except re.error as err:
                check(False, "targets", f"targets[{i}]={pattern!r} is not a regular expression ({err})")
