"""Start a run from the adapters of earlier runs (masked adapters: pretext, then transfer).

Each source is an earlier run directory. Its ``model.adapter`` (read from its config.yaml) is
injected into the new model first, the adapter weights are copied from the run's newest
published checkpoint (trainable-only state: only the adapter tensors that the injection
created are taken; pretext heads such as the MIM decoder are left behind), and those adapters
are frozen. The new run's own ``model.adapter`` is added afterwards and is what trains; its
checkpoints hold only that, and a resume rebuilds the frozen part from the same sources.

The frozen base must be the one the source trained on: same ``model.init_seed`` (random-init
towers), tokenizer, local weights and tower sizes; anything else is refused by name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dodo.adapters.config import AdapterConfig
from dodo.adapters.state import adapter_state_dict

# The tower-defining CLIP keys; objective, loss weights, trainable heads may differ.
CLIP_BASE_KEYS = ("path", "image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                  "text_hidden", "text_layers", "text_heads", "max_text_len", "projection_dim")


def read_source(source: str, key: str = "model.clip.init_adapters") -> tuple[Any, dict[str, torch.Tensor], Path]:
    """(the source run's JobConfig, its newest checkpoint's trainable state, checkpoint path)."""
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir
    from dodo.train import checkpoint

    if not Path(source).exists():
        raise FileNotFoundError(f"{key}: {source} does not exist; name the run directory printed by "
                                "`dodo submit` for the earlier stage (runs/<name>/<id>)")
    try:
        run = RunDir.open(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from None
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise FileNotFoundError(f"{key}: {run.path} has no published checkpoint; finish that run first "
                                f"(`dodo submit {run.path}` resumes it)")
    cfg = load_job(run.config)
    state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return cfg, state, ckpt.path


def check_same_base(own: Any, other: Any, source: str) -> None:
    """Refuse a source whose frozen base differs from this run's (ModelConfig of each)."""
    diffs = []
    for name in ("family", "init_seed", "tokenizer"):
        if getattr(own, name) != getattr(other, name):
            diffs.append(f"model.{name}: {getattr(other, name)!r} there, {getattr(own, name)!r} here")
    for name in CLIP_BASE_KEYS:
        if getattr(own.clip, name) != getattr(other.clip, name):
            diffs.append(f"model.clip.{name}: {getattr(other.clip, name)!r} there, {getattr(own.clip, name)!r} here")
    if other.clip.init_adapters:
        diffs.append("it starts from adapters of other runs itself (one level of init_adapters only)")
    if diffs:
        raise ValueError(f"model.clip.init_adapters: {source} was trained on another frozen base: "
                         + "; ".join(diffs) + ". Use the same model settings as that run")


def start_from_runs(model: nn.Module, sources: list[str], own_cfg: Any,
                    add: Callable[[AdapterConfig], list[str]]) -> dict[str, list[str]]:
    """Inject, load and freeze the adapters of each source run into ``model``.

    ``add(adapter_cfg)`` injects one adapter config into the model (the family's ``inject``
    call). Returns {source: names of the loaded tensors}.
    """
    loaded: dict[str, list[str]] = {}
    for source in sources:
        cfg, state, ckpt = read_source(source)
        check_same_base(own_cfg, cfg.model, source)
        if cfg.model.adapter.kind == "none":
            raise ValueError(f"model.clip.init_adapters: {source} has no adapters (model.adapter.kind=none)")
        before = set(adapter_state_dict(model))
        add(dataclasses.replace(cfg.model.adapter))
        params = dict(model.named_parameters())
        new = sorted(k for k in adapter_state_dict(model) if k not in before and k in params)
        missing = [k for k in new if k not in state]
        if missing:
            raise ValueError(f"model.clip.init_adapters: {ckpt} lacks adapter weights {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''} of its own model.adapter config")
        with torch.no_grad():
            for k in new:
                if params[k].shape != state[k].shape:
                    raise ValueError(f"model.clip.init_adapters: {ckpt}: {k} has shape {tuple(state[k].shape)}, "
                                     f"the model expects {tuple(params[k].shape)}")
                params[k].copy_(state[k])
                params[k].requires_grad_(False)
        loaded[source] = new
    return loaded
