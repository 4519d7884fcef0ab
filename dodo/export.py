"""`dodo export RUN --format peft|merged --out DIR`: a trained run's adapters for other tools.

  peft    DIR/<module>/adapter_config.json + adapter_model.safetensors, PEFT's format, for every
          Hugging Face model inside the run's model that carries adapters (MAGMA: DIR/lm, the
          CLIP family: DIR/clip). Load with ``PeftModel.from_pretrained(base, DIR/<module>)``.
          LoRA only: PEFT has no type for dodo's other adapters (dodo/adapters/peft_io.py).
  merged  DIR/<module>/ a save_pretrained directory of that model with the adapters folded into
          its weights (LoRA, R-Adapter); ``AutoModel*.from_pretrained(DIR/<module>)`` needs no dodo.

The run's model is rebuilt from its config.yaml (its frozen base from the configured sources)
and the newest checkpoint's trainable state is loaded, as `dodo eval` does. Everything is
written to a temporary directory beside DIR and renamed into place at the end: on any error
nothing is left at DIR.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from dodo.config.errors import ConfigError

FORMATS = ("peft", "merged")


def adapted_hf_models(model, tuned: bool = False) -> dict[str, object]:  # noqa: ANN001 - an nn.Module, torch imported late
    """name -> every transformers PreTrainedModel directly under ``model`` that holds dodo adapters;
    with ``tuned``, also those whose own weights trained (full fine-tuning, trainable heads):
    their merged export is the tuned model itself."""
    from transformers import PreTrainedModel
    out = {}
    for name, child in model.named_children():
        if not isinstance(child, PreTrainedModel):
            continue
        if any(getattr(m, "is_dodo_adapter", False) for m in child.modules()) or (
                tuned and any(p.requires_grad for p in child.parameters())):
            out[name] = child
    return out


def export_run(run_dir: str, fmt: str, out: str) -> list[Path]:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory; choose a new path")
    import torch

    from dodo.adapters.peft_io import PeftFormatError, export_merged, export_peft
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir
    from dodo.tasks import build_task
    from dodo.train import checkpoint
    from dodo.train.init_from import read_init

    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise ConfigError(f"{run.path} has no published checkpoint yet; train it first")
    torch.manual_seed(cfg.model.init_seed)  # a random-init frozen base is rebuilt as in training
    task = build_task(cfg, read_init(cfg))
    state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    _, unexpected = task.model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"{ckpt.path} does not fit the model of {run.config}: unexpected {sorted(unexpected)[:3]}")
    models = adapted_hf_models(task.model, tuned=fmt == "merged")
    if not models:
        hint = "" if fmt == "merged" else " (a fully fine-tuned run exports with --format merged)"
        raise ConfigError(f"{run.path}: model.adapter.kind={cfg.model.adapter.kind} placed no adapters in a "
                          f"Hugging Face model and trained none of its weights; nothing to export{hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, module in models.items():
            module.eval()
            if fmt == "peft":
                task_type = "CAUSAL_LM" if name == "lm" else "FEATURE_EXTRACTION"
                export_peft(module, tmp / name, base_model_name_or_path=_base_path(cfg, name), task_type=task_type)
            else:
                export_merged(module, tmp / name, plain_ok=True)  # full fine-tuning: the tuned weights
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except PeftFormatError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{run.path}: {err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = [target / name for name in models]
    for path in written:
        print(f"{fmt}: {path}", flush=True)
    return written


def _base_path(cfg, name: str) -> str:  # noqa: ANN001
    """The base model's local path as the job names it ("" for a random-init base)."""
    section = getattr(cfg.model, name, None)
    for attr in ("path",):
        value = getattr(section, attr, None) if section is not None else None
        if isinstance(value, str):
            return value
    source = getattr(section, "source", None)
    return getattr(source, "path", "") or ""
