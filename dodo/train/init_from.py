"""Tensors a run starts from that other runs wrote, read before its model is built.

The model layer never opens another run's directory (docs/architecture.md, layers): the
trainer (and `dodo eval`) call ``read_init(cfg)`` and hand the result to ``build_task``.

- ``model.moe.upcycle_from``: a file written by `dodo upcycle`, a dense run directory (its
  newest checkpoint) or a folder of runs (the newest with a checkpoint) -> the dense trainable
  state that every expert starts from (sparse upcycling; dodo.moe.inject.upcycle).
- ``model.vlmo.init_from`` (``ModelConfig.init_weights_run``): an earlier stage's run -> the
  weights it ended with, merged over its own earlier stages (``read_stage_weights``).
- ``model.clip.init_adapters`` (``ModelConfig.init_adapter_runs``): earlier runs -> each run's
  ``model.adapter`` and trainable state, after checking it trained on the same frozen base
  (``ModelConfig.frozen_base``); dodo.adapters.transfer injects and freezes them.

`dodo upcycle RUN` (``create_upcycled_run``) lives here too: it reads a run's checkpoint and
writes the new run's config and init/upcycled.pt.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from dodo.adapters.transfer import KEY as ADAPTERS_KEY
from dodo.adapters.transfer import AdapterSource
from dodo.config.errors import ConfigError
from dodo.models.registry import InitState
from dodo.rundir import RunDir
from dodo.train import checkpoint

UPCYCLED_FILE = "init/upcycled.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's non-expert trainable weights


def read_init(cfg: Any) -> InitState:
    """The tensors ``cfg`` (a JobConfig) names from other runs; an empty InitState if none."""
    model = cfg.model
    dense = load_dense_state(model.moe.upcycle_from) if model.moe.enabled and model.moe.upcycle_from else None
    stage = model.init_weights_run()
    return InitState(dense_state=dense,
                     adapters=[read_adapter_source(s, model) for s in model.init_adapter_runs()],
                     weights=read_stage_weights(stage, model.family) if stage else None)


def _trainable_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_dir / MODEL_STATES, map_location="cpu", weights_only=False)["module"]


# ---------------------------------------------------------------- adapters of earlier runs


def _earlier_run(source: str, key: str, what: str) -> tuple[RunDir, Any, Any]:
    """An earlier run named by ``key`` -> (its RunDir, newest checkpoint, ModelConfig); a missing
    directory or a run without a published checkpoint is one message naming ``key``."""
    from dodo.config.loader import load_job

    if not Path(source).exists():
        raise FileNotFoundError(f"{key}: {source} does not exist; name the run directory printed by "
                                "`dodo submit` for the earlier stage (runs/<name>/<id>)")
    try:
        run = RunDir.open(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from None
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise FileNotFoundError(f"{key}: {run.path} has no published checkpoint; finish that {what} first "
                                f"(`dodo submit {run.path}` resumes it)")
    return run, ckpt, load_job(run.config).model


def read_adapter_source(source: str, own: Any) -> AdapterSource:
    """One earlier run -> its adapter config and newest trainable state; refuses a run trained
    on another frozen base than ``own`` (this run's ModelConfig)."""
    run, ckpt, other = _earlier_run(source, ADAPTERS_KEY, "run")
    mine, theirs = own.frozen_base(), other.frozen_base()
    diffs = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in mine.items() if theirs.get(k) != v]
    if other.init_adapter_runs():
        diffs.append("it starts from adapters of other runs itself (one level of init_adapters only)")
    if diffs:
        raise ValueError(f"{ADAPTERS_KEY}: {source} was trained on another frozen base: "
                         + "; ".join(diffs) + ". Use the same model settings as that run")
    return AdapterSource(source=source, checkpoint=str(ckpt.path), adapter=other.adapter,
                         state=_trainable_state(ckpt.path))


# ---------------------------------------------------------------- weights of earlier stages


def read_stage_weights(source: str, family: str, key: str = "model.vlmo.init_from",
                       depth: int = 0) -> dict[str, torch.Tensor]:
    """An earlier stage's run -> the weights it ended with. Checkpoints hold trainable tensors
    only, so a stage that froze some (VLMo's text stage freezes attention and the image expert)
    is merged over the stage it started from, recursively: oldest first, newer values win."""
    if depth > 16:
        raise ValueError(f"{key}: the chain of stages through {source} is longer than 16 (a cycle?)")
    run, ckpt, other = _earlier_run(source, key, "stage")
    if other.family != family:
        raise ValueError(f"{key}: {source} is a model.family={other.family} run, this one is {family}; "
                         "start from a run of the same family")
    earlier = other.init_weights_run()
    state = read_stage_weights(earlier, family, key, depth + 1) if earlier else {}
    state.update(_trainable_state(ckpt.path))
    return state


# ---------------------------------------------------------------- sparse upcycling


def _newest_checkpoint(run: Path) -> Path | None:
    ckpt = checkpoint.latest(RunDir(run))
    return ckpt.path if ckpt is not None else None


def resolve_dense_source(path: str) -> Path:
    """A file (written by `dodo upcycle`), a run directory, or a folder of runs -> one file or
    checkpoint directory to read the dense trainable state from."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"model.moe.upcycle_from={path!r} does not exist; point it at a dense "
                                "run directory or a file written by `dodo upcycle`")
    if (p / "config.yaml").is_file():
        ckpt = _newest_checkpoint(p)
        if ckpt is None:
            raise FileNotFoundError(f"dense run {p} has no published checkpoint yet; train it first "
                                    "(or let it reach train.save_every)")
        return ckpt
    runs = sorted((r for r in p.iterdir() if (r / "config.yaml").is_file() and _newest_checkpoint(r)),
                  key=lambda r: r.name)
    if not runs:
        raise FileNotFoundError(f"model.moe.upcycle_from={path!r} holds no run with a checkpoint; "
                                "run the dense job first (e.g. `dodo submit jobs/demo.yaml`)")
    return _newest_checkpoint(runs[-1])  # run ids start with their creation time


def load_dense_state(path: str) -> dict[str, torch.Tensor]:
    source = resolve_dense_source(path)
    if source.is_file():
        return torch.load(source, map_location="cpu", weights_only=False)["dense_state"]
    if any(source.glob("layer_*_expert_*_model_states.pt")):
        raise ValueError(f"{source} is a checkpoint of an MoE run; upcycling starts from a dense one")
    return {k: v.float() for k, v in _trainable_state(source).items()}


def create_upcycled_run(dense_run: str, experts: int, top_k: int | None, noise: float,
                        overrides: Sequence[str]) -> Path:
    """`dodo upcycle`: make the new run directory (config + init/upcycled.pt); nothing is
    written on error. The new run's config is the dense run's with ``model.moe`` on and
    ``model.moe.upcycle_from`` naming that file; routers start fresh, the optimizer from scratch."""
    from dodo.config.loader import config_to_dict, dump_config, load_job
    from dodo.rundir import write_atomic

    run = RunDir.open(dense_run)
    dense_cfg = load_job(run.config)
    if dense_cfg.model.moe.enabled:
        raise ConfigError(f"{run.path} is already an MoE run (model.moe.num_experts="
                          f"{dense_cfg.model.moe.num_experts}); upcycle a dense run")
    ckpt = _newest_checkpoint(run.path)
    if ckpt is None:
        raise ConfigError(f"{run.path} has no published checkpoint to upcycle; train it first")
    tree = config_to_dict(dense_cfg)
    tree["name"] = f"{dense_cfg.name}_upcycled"
    moe = tree["model"]["moe"]
    moe.update(num_experts=experts, upcycle_noise=noise, upcycle_from="<set below>")
    if top_k is not None:
        moe["top_k"] = top_k
    cfg = _with_overrides(tree, overrides)
    state = load_dense_state(str(ckpt.parent.parent))
    # The config names the file by its absolute path, known once the directory exists.
    new = RunDir.create(cfg.runs_dir, cfg.name, "")
    try:
        target = new.path / UPCYCLED_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"dense_state": state, "source": str(ckpt), "experts": experts}, target)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, moe=dataclasses.replace(cfg.model.moe, upcycle_from=str(target.resolve()))))
        write_atomic(new.config, dump_config(cfg))
    except BaseException:
        new.remove()
        raise
    return new.path


def _with_overrides(tree: dict, overrides: Sequence[str]) -> Any:
    """The dense run's resolved config with the MoE settings and key=value overrides, validated."""
    import yaml

    from dodo.config.loader import load_job

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "upcycled.yaml"
        tree = {**tree, "model": {**tree["model"], "moe": {**tree["model"]["moe"], "upcycle_from": ""}}}
        job.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_job(job, overrides)
