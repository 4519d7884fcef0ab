"""VLMo's tasks (tasks layer, found through ``dodo.models.vlmo.FAMILY.task``).

Stage vl (``VlmoRetrievalTask``): the contrastive task (ITC retrieval, zero-shot, kNN, ID and
OOD) plus retrieval re-ranked by the fusion encoder.
Stages vqa / nlvr2: ``VqaTask`` / ``Nlvr2Task`` in task_finetune.py.
Stages mim / mlm (``VlmoStageTask``): image-only / text-only pretraining; batches carry only
the stage's modality (``StageCollator``), so mim trains from an image-only cache (class
folders, CIFAR) and mlm from a text-only cache (``dodo data cache --from text``) as well as
from image-text data. Held-out metric: ``eval.mim_accuracy`` (visual-token top-1 on the masked
patches) or ``eval.mlm_accuracy``, on masks drawn from a fixed seed.

Re-ranking (``model.vlmo.rerank_k`` = k > 0): for each query the k best candidates by the
dual encoder's cosine similarity are re-ordered by the ITM log-odds of the fused pair and stay
above every other candidate (the rest keep their ITC order), as VLMo and ALBEF evaluate.
Reported next to the ITC metrics as ``eval.<id|ood>.itm_{tr,ir}_r<k>`` and ``itm_r_mean``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from dodo.config.schema import JobConfig
from dodo.data.collate import CaptionCollator
from dodo.eval.retrieval import positives_from_captions, recall_at_k
from dodo.models.registry import InitState
from dodo.tasks import Task
from dodo.tasks.contrastive import ContrastiveTask

_ABOVE = 1.0e4  # lifts the re-ranked top k above every cosine similarity (|cos| <= 1)


EVAL_SEED, EVAL_BATCH = 1234, 128


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    if cfg.model.vlmo.stage in ("mim", "mlm"):
        return VlmoStageTask(cfg, init)
    if cfg.model.vlmo.stage in ("vqa", "nlvr2"):  # fine-tuning on the fusion encoder's heads (task_finetune.py)
        from dodo.models.vlmo.task_finetune import Nlvr2Task, VqaTask
        return VqaTask(cfg, init) if cfg.model.vlmo.stage == "vqa" else Nlvr2Task(cfg, init)
    return VlmoRetrievalTask(cfg, init)


class StageCollator:
    """Samples -> the one modality a pretraining stage reads: {"images"} (mim: float32,
    normalised) or {"input_ids", "attention_mask"} (mlm). A text cache's samples have no image,
    an image-only cache's an empty caption: neither reaches the other stage's model input."""

    def __init__(self, base: CaptionCollator, stage: str):
        self.base, self.stage = base, stage
        self.image_mean, self.image_std = base.image_mean, base.image_std  # DeviceBatch reads these

    def __call__(self, samples: list) -> dict:
        if self.stage == "mim":
            missing = [s.key for s in samples if s.image is None]
            if missing:
                raise ValueError(f"model.vlmo.stage=mim needs images, but sample {missing[0]} has none (a text "
                                 "cache?); point data.train_cache at an image or image-text cache")
            return {"images": self.base.images(samples), "keys": [s.key for s in samples]}
        ids, mask = self.base.caption_ids(samples)
        return {"input_ids": ids, "attention_mask": mask, "captions": [s.caption for s in samples]}


class VlmoStageTask(ContrastiveTask):
    """Stage mim or mlm; the model's forward returns the stage's loss."""

    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        super().__init__(cfg, init)
        self.collate = StageCollator(self.collate, cfg.model.vlmo.stage)

    @torch.no_grad()
    def stage_metrics(self, model: nn.Module) -> dict[str, float]:
        stage = self.cfg.model.vlmo.stage
        device = next(model.parameters()).device
        total_loss, total_acc, n = 0.0, 0.0, 0
        g = torch.Generator().manual_seed(EVAL_SEED)
        with torch.random.fork_rng(devices=[]):  # MLM's masks come from the global RNG
            torch.manual_seed(EVAL_SEED)
            for lo in range(0, len(self.eval_set), EVAL_BATCH):
                batch = self.collate([self.eval_set[i] for i in range(lo, min(len(self.eval_set), lo + EVAL_BATCH))])
                if stage == "mim":
                    loss, acc = model.mim(batch["images"].to(device), generator=g)
                else:
                    loss, acc = model.mlm_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                rows = len(batch["keys"] if stage == "mim" else batch["captions"])
                total_loss, total_acc, n = total_loss + float(loss) * rows, total_acc + acc * rows, n + rows
        return {"eval.loss": total_loss / n, f"eval.{stage}_accuracy": total_acc / n}

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Every rank computes the same small metrics; no reduction needed."""
        was = model.training
        model.eval()
        out = self.stage_metrics(model)
        model.train(was)
        return out

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        stage = self.cfg.model.vlmo.stage
        m = self.evaluate(model, EVAL_BATCH, 0, 1)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {}, [f"eval.{stage}_accuracy on {len(self.eval_set)} held-out samples: {m[f'eval.{stage}_accuracy']:.4f}",
                    f"stage {stage}: {trainable:,} trainable parameters; the next stage starts from this run "
                    "(model.vlmo.init_from=<this run directory>)"]

    def run_eval(self, model, name, out_dir):  # type: ignore[override]
        raise ValueError(f"a VLMo {self.cfg.model.vlmo.stage} stage has no `dodo eval` tasks (its held-out metric "
                         "is in summary.json); evaluate retrieval on the vl stage's run")


class VlmoRetrievalTask(ContrastiveTask):
    """data.image_size / max_caption_tokens against the model: checked at submit (vlmo/config.py)."""

    def split_metrics(self, model: nn.Module, ds: Dataset, tag: str) -> dict[str, float]:
        out = super().split_metrics(model, ds, tag)
        if self.cfg.model.vlmo.rerank_k > 0:
            out.update({f"eval.{tag}.{k}": v for k, v in self.rerank_metrics(model, ds).items()})
        return out

    @torch.no_grad()
    def rerank_metrics(self, model: nn.Module, ds: Dataset, batch_size: int = 256) -> dict[str, float]:
        device = next(model.parameters()).device
        img, txt, caps = self.embed(model, ds)
        texts = sorted(set(caps))
        sim = img @ torch.stack([txt[caps.index(t)] for t in texts]).T  # (images, unique texts)
        positives = positives_from_captions(caps, texts)
        images = torch.cat([self.collate([ds[i] for i in range(lo, min(len(ds), lo + batch_size))])["images"]
                            for lo in range(0, len(ds), batch_size)])
        ids, mask = self.collate.token_ids(texts)

        def rerank(scores: torch.Tensor) -> torch.Tensor:
            """Rows are queries over images x texts (or texts x images when transposed)."""
            k = min(self.cfg.model.vlmo.rerank_k, scores.shape[1])
            rows = torch.arange(scores.shape[0]).repeat_interleave(k)
            cols = scores.topk(k, dim=1).indices.flatten()
            i, t = (rows, cols) if scores.shape == sim.shape else (cols, rows)
            itm = torch.cat([model.itm_score(images[i[lo:lo + batch_size]].to(device),
                                             ids[t[lo:lo + batch_size]].to(device),
                                             mask[t[lo:lo + batch_size]].to(device)).float().cpu()
                             for lo in range(0, len(rows), batch_size)])
            out = scores.clone()
            out[rows, cols] = _ABOVE + itm
            return out

        ks = self.cfg.eval.retrieval_ks
        tr = recall_at_k(rerank(sim), positives, ks)
        ir = recall_at_k(rerank(sim.T.contiguous()).T, positives, ks)
        res = {f"itm_{k}": v for k, v in tr.items() if k.startswith("tr_")}
        res.update({f"itm_{k}": v for k, v in ir.items() if k.startswith("ir_")})
        res["itm_r_mean"] = sum(res.values()) / len(res)
        return res
