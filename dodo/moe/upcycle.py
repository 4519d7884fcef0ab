"""Sparse upcycling: a trained dense-adapter run -> the initial checkpoint of a new MoE run.

`dodo upcycle RUN --experts E [--top-k k]` reads RUN's latest checkpoint (its trainable state:
adapters, prefix projection, ...), writes it to ``<new run>/init/upcycled.pt`` and creates the
new run directory, whose config is RUN's with ``model.moe`` on and ``model.moe.upcycle_from``
pointing at that file. When the new run starts, the model copies the dense adapter into every
expert (dodo.moe.inject.upcycle), routers start fresh, and the optimizer starts from scratch
(the dense run's optimizer state is not carried over), as in Komatsuzaki et al.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from dodo.config.errors import ConfigError

UPCYCLED_FILE = "init/upcycled.pt"


def _newest_checkpoint(run: Path) -> Path | None:
    from dodo.rundir import RunDir
    from dodo.train import checkpoint

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
    model_file = source / "mp_rank_00_model_states.pt"
    if any(source.glob("layer_*_expert_*_model_states.pt")):
        raise ValueError(f"{source} is a checkpoint of an MoE run; upcycling starts from a dense one")
    state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def create_upcycled_run(dense_run: str, experts: int, top_k: int | None, noise: float,
                        overrides: Sequence[str]) -> Path:
    """Make the new run directory (config + init/upcycled.pt); nothing is written on error."""
    from dodo.config.loader import config_to_dict, dump_config, load_job
    from dodo.rundir import RunDir, write_atomic

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


def _with_overrides(tree: dict, overrides: Sequence[str]):
    """The dense run's resolved config with the MoE settings and key=value overrides, validated."""
    import tempfile

    import yaml

    from dodo.config.loader import load_job

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "upcycled.yaml"
        tree = {**tree, "model": {**tree["model"], "moe": {**tree["model"]["moe"], "upcycle_from": ""}}}
        job.write_text(yaml.safe_dump(tree, sort_keys=False))
        return load_job(job, overrides)
