"""Start a model from the adapters of earlier runs (masked adapters: pretext, then transfer).

The train layer (dodo/train/init_from.py) reads each earlier run before the model is built:
its ``model.adapter`` config and the adapter tensors of its newest checkpoint, after checking
that it trained on the same frozen base. Here, on the freshly built model, each source's
adapters are injected first, filled from those tensors (only the tensors that the injection
created are taken; pretext heads such as the MIM decoder are left behind), and frozen. The new
run's own ``model.adapter`` is added afterwards and is what trains; its checkpoints hold only
that, and a resume rebuilds the frozen part from the same sources.

No file is read here: adapters take state dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dodo.adapters.config import AdapterConfig
from dodo.adapters.state import adapter_state_dict

KEY = "model.clip.init_adapters"


@dataclass
class AdapterSource:
    """One earlier run's adapters: where they came from, their config and trainable state."""

    source: str  # the run directory, as the job names it
    checkpoint: str  # the checkpoint the tensors were read from (for messages)
    adapter: AdapterConfig  # that run's model.adapter
    state: dict[str, torch.Tensor]  # its trainable state (name -> tensor), adapters among it


def start_from_sources(model: nn.Module, sources: list[AdapterSource],
                       add: Callable[[AdapterConfig], list[str]]) -> dict[str, list[str]]:
    """Inject, load and freeze each source's adapters in ``model``, in order.

    ``add(adapter_cfg)`` injects one adapter config into the model (the family's ``inject``
    call). Returns {source: names of the loaded tensors}.
    """
    loaded: dict[str, list[str]] = {}
    for src in sources:
        if src.adapter.kind == "none":
            raise ValueError(f"{KEY}: {src.source} has no adapters (model.adapter.kind=none)")
        before = set(adapter_state_dict(model))
        add(dataclasses.replace(src.adapter))
        params = dict(model.named_parameters())
        new = sorted(k for k in adapter_state_dict(model) if k not in before and k in params)
        missing = [k for k in new if k not in src.state]
        if missing:
            raise ValueError(f"{KEY}: {src.checkpoint} lacks adapter weights {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''} of its own model.adapter config")
        with torch.no_grad():
            for k in new:
                if params[k].shape != src.state[k].shape:
                    raise ValueError(f"{KEY}: {src.checkpoint}: {k} has shape {tuple(src.state[k].shape)}, "
                                     f"the model expects {tuple(params[k].shape)}")
                params[k].copy_(src.state[k])
                params[k].requires_grad_(False)
        loaded[src.source] = new
    return loaded
