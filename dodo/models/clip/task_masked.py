"""Pretext tasks of the masked-adapter recipe on a frozen CLIP (``model.clip.objective``).

mim: masked image modelling on the vision tower. ``mim_mask_ratio`` of the patches are
     replaced by a learned colour at the input; a light linear decoder predicts each masked
     patch's per-patch normalised pixels from the tower's patch tokens; L1 on the masked
     patches. Held-out metric ``eval.mim_l1`` (lower is better).
mlm: masked language modelling on the text tower (BERT 80/10/10 masking at ``mlm_prob``; a
     linear head on the tower's tokens; CLIP's text tower stays causal). Held-out metric
     ``eval.mlm_accuracy`` (top-1 on the masked tokens, higher is better).

Held-out masks are drawn from a fixed seed (``EVAL_SEED``), so every evaluation of a run, on
every rank, scores the same masked inputs. The data and the OOD hold-out are the contrastive
task's: on the synthetic shapes, the held-out colour-shape pairs stay unseen by the pretext stage too.

Unimodal caches (docs/data.md): MIM trains from an image-only cache (class folders: captions
"", only the images are read), MLM from a text-only cache (``--from text``: a sample's image is
None, a batch has ``images`` None and the model's forward reads the ids alone). An image-text
cache feeds either. The wrong modality (MIM on text, MLM on images) is refused at submit by
``dodo.models.clip.config.validate_job``; a pretext run measures no eval suite by default.
"""

from __future__ import annotations

import torch
from torch import nn

from dodo.tasks.contrastive import ContrastiveTask

EVAL_SEED = 1234
EVAL_BATCH = 256


class MaskedTask(ContrastiveTask):
    """Trains ``model.clip.objective`` (mim | mlm) alone; the model's forward returns its loss."""

    @torch.no_grad()
    def pretext_metrics(self, model: nn.Module) -> dict[str, float]:
        objective = self.cfg.model.clip.objective
        device = next(model.parameters()).device
        total_loss, total_metric, n = 0.0, 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(EVAL_SEED)
            for lo in range(0, len(self.eval_set), EVAL_BATCH):
                items = [self.eval_set[i] for i in range(lo, min(len(self.eval_set), lo + EVAL_BATCH))]
                batch = self.collate(items)
                if objective == "mim":
                    loss, _ = model.mim(batch["images"].to(device))
                    metric = float(loss)
                else:
                    loss, metric = model.mlm(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                total_loss += float(loss) * len(items)
                total_metric += metric * len(items)
                n += len(items)
        name = "eval.mim_l1" if objective == "mim" else "eval.mlm_accuracy"
        return {"eval.loss": total_loss / n, name: total_metric / n}

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Every rank computes the same small metrics; no reduction needed."""
        was = model.training
        model.eval()
        out = self.pretext_metrics(model)
        model.train(was)
        return out

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        m = self.evaluate(model, EVAL_BATCH, 0, 1)
        key = "eval.mim_l1" if "eval.mim_l1" in m else "eval.mlm_accuracy"
        loaded = ", ".join(model.adapted_modules[:2]) + (" ..." if len(model.adapted_modules) > 2 else "")
        return {}, [f"{key} on {len(self.eval_set)} held-out samples: {m[key]:.4f}",
                    f"adapters for the transfer stage (model.clip.init_adapters): {len(model.adapted_modules)} "
                    f"modules ({loaded})"]

    def run_eval(self, model, name, out_dir):  # type: ignore[override]
        raise ValueError(f"a {self.cfg.model.clip.objective} pretext run has no `dodo eval` tasks (its held-out "
                         "metric is in summary.json); "
                         "evaluate retrieval on the transfer run (jobs/masked_adapters_transfer.yaml)")
