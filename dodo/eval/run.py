"""`dodo eval RUN --task retrieval|zeroshot|knn|wise|all`: evaluate a run's latest checkpoint.

Rebuilds the run's task from its config.yaml (the frozen base from model.init_seed or its
local weights), loads the trainable state of the newest checkpoint, and runs the task's
evaluation on this process. Results go to <run>/eval/<task>.json (the WiSE curve also to
wise.md / wise.png) and are printed.
"""

from __future__ import annotations

import json

import torch

from dodo.config.errors import ConfigError

TASKS = ("retrieval", "zeroshot", "knn", "wise")


def eval_run(run_dir: str, task_name: str) -> int:
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir, write_json_atomic
    from dodo.tasks import build_task
    from dodo.train import checkpoint
    from dodo.train.init_from import read_init

    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run.path} has no published checkpoint yet; train it first "
                                f"(`dodo submit {run.path}` resumes it)")
    torch.manual_seed(cfg.model.init_seed)  # the frozen random-init base, as in training
    task = build_task(cfg, read_init(cfg))
    if not hasattr(task, "run_eval"):
        raise ConfigError(f"{run.path}: model.family={cfg.model.family} has no `dodo eval` tasks "
                          "(they are for the contrastive families clip and vlmo)")
    state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    missing, unexpected = task.model.load_state_dict(state, strict=False)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ConfigError(f"{ckpt.path} does not fit the model of {run.config}: unexpected "
                          f"{sorted(unexpected)[:3]}, missing {sorted(trainable & set(missing))[:3]}")
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    for name in TASKS if task_name == "all" else (task_name,):
        results, lines = task.run_eval(task.model, name, out_dir)
        write_json_atomic(out_dir / f"{name}.json", {"step": ckpt.step, **results})
        print(f"{name} ({run.path.name}, step {ckpt.step}):", *lines, sep="\n", flush=True)
    return 0
