"""The ``model:`` section: the keys every family shares, and how a family's own keys are found.

Each family's folder defines a subclass (dodo/models/<family>/config.py) that adds its own
keys: MAGMA ``lm`` / ``image_encoder`` / ``prefix_dropout``, CLIP ``clip``, VLMo ``vlmo``.
The loader builds the subclass named by ``model.family`` (``config_class_for``), so a job's
resolved config.yaml holds its own family's keys only, and another family's keys are an
error naming the fix. Sizes live in configs/model/*.yaml and are found by name.
Torch-free (used at submit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import get_args, get_type_hints

from dodo.adapters.config import AdapterConfig
from dodo.config.errors import ConfigValueError, check
from dodo.config.preflight import MUST_EXIST
from dodo.moe.config import MoEConfig

DEFAULT_FAMILY = "magma"


@dataclass
class ModelConfig:
    """Shared by every family; never built alone (a family's subclass is)."""

    family: str = DEFAULT_FAMILY  # a registered family: dodo/models/<family>/ (magma, clip, vlmo)
    init_seed: int = 0  # frozen random-init weights are rebuilt from this seed on every rank
    # builtin:synthetic, or a local tokenizer directory / tokenizer.json
    tokenizer: str = field(default="builtin:synthetic", metadata=MUST_EXIST)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)  # mixture-of-experts adapters (dodo/moe)

    def __post_init__(self) -> None:
        from dodo.models import registry

        check(self.family in registry.names(), "family",
              f"must name a registered model family ({', '.join(registry.names())}), got {self.family!r}")
        spec = registry.family(self.family)
        check(type(self) is spec.config, "family",
              f"this config is a {type(self).__name__}, but family {self.family} is configured by "
              f"{spec.config.__module__}.{spec.config.__name__}")
        why = spec.refused_adapters.get(self.adapter.kind)
        check(why is None, "adapter.kind",
              f"is {self.adapter.kind}, but model.family={self.family} does not take {self.adapter.kind} adapters "
              f"({why}); use one of "
              + ", ".join(k for k in adapter_kinds() if k not in spec.refused_adapters))
        check(not self.moe.enabled or spec.supports_moe, "moe.num_experts",
              f"MoE adapters go into the MAGMA LM; model.family={self.family} has none: "
              "set model.moe.num_experts=0")
        check(not self.moe.enabled or self.adapter.kind == "bottleneck", "adapter.kind",
              f"MoE adapters replace the bottleneck adapters of model.moe.layers, but model.adapter.kind="
              f"{self.adapter.kind} places none; set model.adapter.kind=bottleneck (its placement and "
              "locations are used; model.moe.expert picks the expert type) or model.moe.num_experts=0")

    # ------------------------------------------------------------ family hooks (overridden)

    def frozen_base(self) -> dict[str, object]:
        """The keys that define the frozen base weights: runs whose adapters are combined
        (model.clip.init_adapters) must agree on all of them. Families add their towers."""
        return {"model.family": self.family, "model.init_seed": self.init_seed, "model.tokenizer": self.tokenizer}

    def init_adapter_runs(self) -> list[str]:
        """Earlier runs whose adapters this run starts from, frozen (none unless the family has the key)."""
        return []

    def init_weights_run(self) -> str:
        """An earlier stage's run whose weights this run starts from ("": none; VLMo's stages)."""
        return ""

    # ------------------------------------------------------------ loader hook

    @classmethod
    def config_class_for(cls, data: Mapping) -> type:
        """The family's subclass for the raw ``model:`` mapping ``data`` (called by the loader).

        Raises ConfigValueError(key, message) for an unknown family or another family's key.
        """
        from dodo.models import registry

        name = data.get("family", DEFAULT_FAMILY)
        if not isinstance(name, str) or name not in registry.names():
            raise ConfigValueError("family", f"must name a registered model family ({', '.join(registry.names())}), "
                                   f"got {name!r}")
        spec = registry.family(name)
        own = {f.name for f in dataclasses.fields(spec.config)}
        for key in data:
            if key in own:
                continue
            for other in registry.all_families():
                if key in {f.name for f in dataclasses.fields(other.config)}:
                    raise ConfigValueError(
                        key, f"belongs to model.family={other.name}, but this job's model.family is {name}; "
                             f"remove model.{key} (a {name} job has no such key) or set model.family={other.name}")
        return spec.config


def adapter_kinds() -> list[str]:
    """Every adapter kind of AdapterConfig.kind, in its order (for messages)."""
    return [k for k in get_args(get_type_hints(AdapterConfig)["kind"]) if k != "none"]


def default_model_config() -> ModelConfig:
    """The default family's config (JobConfig's default ``model``)."""
    from dodo.models import registry

    return registry.family(DEFAULT_FAMILY).config()
