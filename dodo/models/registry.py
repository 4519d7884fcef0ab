"""The model-family registry: each family folder exports one ``FamilySpec``, found by name.

``dodo/models/<family>/__init__.py`` defines ``FAMILY = FamilySpec(...)``: the family's section
of ``model:`` (a ``ModelConfig`` subclass), its model builder and the task it trains (both
``"module:callable"`` references, resolved on use: the spec is torch-free config-level data and
imports neither the model nor the tasks layer), the adapter kinds it refuses, whether it takes MoE
adapters, its size flavours (configs/model/*.yaml) and its submit-time checks. Nothing else
in dodo switches on the family name: it asks ``family(name)``.

Torch-free: the config loader uses it at ``dodo submit --dry-run``. Model builders import
torch inside their bodies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from dodo.models.config import ModelConfig

# Families shipped with dodo, one folder each. Others call register() from their own package.
BUILTIN = ("magma", "clip", "vlmo", "prompt", "weak", "lang_adapter")


@dataclass
class InitState:
    """Tensors from other runs, read by the train layer (dodo/train/init_from.py) before the
    model is built, so model code never opens another run's directory.

    ``dense_state``: ``model.moe.upcycle_from``'s dense trainable state (name -> tensor), copied
    into every expert (sparse upcycling). ``adapters``: ``AdapterSource``s
    (dodo/adapters/transfer.py), injected frozen in this order before the run's own adapters.
    ``weights``: the model weights an earlier stage ended with (``ModelConfig.init_weights_run``,
    its chain of stages merged, newest last), name -> tensor, loaded before training starts.
    """

    dense_state: Optional[dict[str, Any]] = None
    adapters: list[Any] = field(default_factory=list)
    weights: Optional[dict[str, Any]] = None


@dataclass(frozen=True)
class FamilySpec:
    name: str
    # The family's ModelConfig subclass: the shared keys plus the family's own section.
    config: type
    # "module:callable" taking (model cfg, vocab_size, eos_token_id, mask_token_id, InitState)
    # and returning the nn.Module; a reference, so that this torch-free spec imports no model code.
    model: str
    # "module:callable" taking (JobConfig, InitState) and returning the family's Task.
    task: str
    # The adapter kinds the family cannot take, kind -> why (refused at submit).
    refused_adapters: dict[str, str] = field(default_factory=dict)
    supports_moe: bool = False  # MoE adapters replace the bottleneck adapters of its LM blocks
    # Size flavours: name -> configs/model/<fragment>.yaml (architectures are data).
    flavours: dict[str, str] = field(default_factory=dict)
    # Cross-section checks at submit (data vs model sizes...): JobConfig -> None, raising
    # ConfigValueError(full.key.path, message). Run by JobConfig.__post_init__ via validate_job.
    validate: Optional[Callable[[Any], None]] = None
    # Describes where the adapters go, for docs and `model.adapter` messages.
    adapter_sites: str = ""
    # The task's callables for the evaluation suites (INTERFACES.md 4): "encode_images",
    # "encode_texts" (contrastive families), "generate" (captioning). For check_suites' hooks.
    eval_hooks: tuple[str, ...] = ()
    # Suite kinds measured on the held-out split when eval.suites is empty and the data is not
    # the synthetic shapes (dodo.eval.suites.effective_suites' default_kinds).
    default_suites: tuple[str, ...] = ()
    # JobConfig -> the default suite kinds when they depend on the job (e.g. none for CLIP's
    # masked pretext stages); None: ``default_suites``. See ``FamilySpec.suites_of``.
    suites_for: Optional[Callable[[Any], tuple[str, ...]]] = None

    def suites_of(self, cfg: Any) -> tuple[str, ...]:
        """The default suite kinds of the job ``cfg`` (its family's)."""
        return tuple(self.suites_for(cfg)) if self.suites_for is not None else self.default_suites


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family (once); returns it, so a package can write ``FAMILY = register(FamilySpec(...))``."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"model family {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtin() -> None:
    for name in BUILTIN:
        if name not in _REGISTRY:
            register(importlib.import_module(f"dodo.models.{name}").FAMILY)


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def family(name: str) -> FamilySpec:
    """The spec registered as ``name``; KeyError names the known families."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model.family {name!r}; known families: {', '.join(sorted(_REGISTRY))}") from None


def all_families() -> list[FamilySpec]:
    return [family(n) for n in names()]


def build_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int, mask_token_id: Optional[int] = None,
                init: Optional[InitState] = None) -> Any:
    """The model of ``cfg.family`` (an nn.Module), sized to the tokenizer's vocabulary."""
    return resolve(family(cfg.family).model)(cfg, vocab_size, eos_token_id, mask_token_id, init or InitState())


def resolve(ref: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imported on demand)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)
