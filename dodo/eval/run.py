"""`dodo eval RUN [--task T | --wise | --weightwatcher]`: evaluate a run's latest checkpoint.

Rebuilds the run's task from its config.yaml (the frozen base from model.init_seed or its
local weights), loads the trainable state of the newest checkpoint, and runs on this process:
  retrieval | zeroshot | knn   the task's own metrics (dodo/tasks/contrastive.py run_eval)
  wise                         the WiSE-FT curve (dodo/eval/wise.py) between the run's stored
                               pretrained state and the tuned weights; at each alpha the job's
                               eval.suites (kNN / zero-shot / retrieval per dataset, ID and OOD,
                               + ood_mean), or without suites the task's held-out metrics
  weightwatcher                WeightWatcher's per-layer power-law alpha (dodo/eval/weightwatch.py)
  suites                       the job's eval.suites again on the final checkpoint (after a
                               metric changed: `dodo table --rescored` then reads these)
  predict                      VLMo vqa / nlvr2 runs: the answers for model.vlmo.predict_cache
                               (e.g. VQA test-dev) in the evaluation servers' formats
                               (dodo/models/vlmo/task_finetune.py)
Results go to <run>/eval/<task>.json (the WiSE curve also to wise.md / wise.png, the layers to
weightwatcher_layers.json) and are printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from dodo.config.errors import ConfigError

TASKS = ("retrieval", "zeroshot", "knn", "wise", "weightwatcher", "suites", "predict")
ALL = ("retrieval", "zeroshot", "knn", "wise")  # `--task all`; weightwatcher on request


def eval_run(run_dir: str, task_names: str | Sequence[str]) -> int:
    from dodo.adapters.state import zero_shot_state
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir, write_json_atomic
    from dodo.tasks import build_task
    from dodo.train import checkpoint
    from dodo.train.init_from import read_init

    names = [task_names] if isinstance(task_names, str) else list(task_names)
    names = [n for name in names for n in (ALL if name == "all" else (name,))]
    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    if "suites" in names and not getattr(cfg.eval, "suites", None):
        raise ConfigError(f"{run.config}: eval.suites is empty, so --task suites has nothing to rerun; "
                          "use --task retrieval / zeroshot / knn for the task's own metrics")
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run.path} has no published checkpoint yet; train it first "
                                f"(`dodo submit {run.path}` resumes it)")
    torch.manual_seed(cfg.model.init_seed)  # the frozen random-init base, as in training
    task = build_task(cfg, read_init(cfg))
    if not hasattr(task, "run_eval") and any(n in ("retrieval", "zeroshot", "knn") for n in names):
        raise ConfigError(f"{run.path}: model.family={cfg.model.family} has no `dodo eval` tasks "
                          "(they are for the contrastive families clip and vlmo)")
    fresh = zero_shot_state(task.model) if "wise" in names else None  # the start, if none was stored
    state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    missing, unexpected = task.model.load_state_dict(state, strict=False)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ConfigError(f"{ckpt.path} does not fit the model of {run.config}: unexpected "
                          f"{sorted(unexpected)[:3]}, missing {sorted(trainable & set(missing))[:3]}")
    out_dir = run.path / "eval"
    out_dir.mkdir(exist_ok=True)
    task.model.eval()
    for name in names:
        if name == "wise":
            results, lines = _wise(task, cfg, run.path, out_dir, fresh)
        elif name == "suites":  # keys as in summary.json's "final" (eval.<kind>.<dataset>.<metric>)
            found, lines = task.suite_report(task.model)
            results = {"final": found}
        elif name == "weightwatcher":
            from dodo.eval.weightwatch import report
            results, lines = report(task.model, out_dir)
        else:
            results, lines = task.run_eval(task.model, name, out_dir)
        write_json_atomic(out_dir / f"{name}.json", {"step": ckpt.step, **results})
        print(f"{name} ({run.path.name}, step {ckpt.step}):", *lines, sep="\n", flush=True)
    return 0


def _wise(task: Any, cfg: Any, run_path: Path, out_dir: Path,
          fresh: dict[str, torch.Tensor] | None) -> tuple[dict[str, Any], list[str]]:
    from dodo.eval.wise import PRETRAINED_FILE, load_pretrained_state, markdown_table, wise_curve, wise_zero_point, \
        write_curve

    stored = load_pretrained_state(run_path)
    note = f"  theta_0: {run_path / PRETRAINED_FILE}" if stored is not None else \
        f"  theta_0: the rebuilt start of the model (the run stored no {PRETRAINED_FILE}: trained before it was written)"
    try:
        zero = wise_zero_point(task.model, stored if stored is not None else fresh)
    except ValueError as err:  # a theta_0 of another model: one line, exit 2
        raise ConfigError(f"{run_path / PRETRAINED_FILE}: {err}") from None

    def metrics(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        if getattr(cfg.eval, "suites", None):  # per dataset, ID and OOD (+ eval.<kind>.ood_mean.*)
            found, _ = task.suite_report(model)
            return {k.removeprefix("eval."): v for k, v in found.items()}
        full = task.evaluate(model, 64, 0, 1)
        out = {k.removeprefix("eval."): v for k, v in full.items() if k.endswith(("r_mean", "zeroshot_top1"))}
        knn = task.knn(model) if hasattr(task, "knn") else None
        if knn is not None:
            out["id.knn_top1"] = knn
        return out

    rows = wise_curve(task.model, metrics, cfg.eval.wise_alphas, zero)
    files = write_curve(rows, out_dir)
    return {"rows": rows, "theta_0": "stored" if stored is not None else "rebuilt"}, \
        [markdown_table(rows), note, f"  curve: {files['png']}"]
