"""VLMo's task (tasks layer, found through ``dodo.models.vlmo.FAMILY.task``): retrieval: the contrastive task (ITC retrieval, zero-shot, kNN, ID and OOD) plus
retrieval re-ranked by the fusion encoder.

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
from dodo.eval.retrieval import positives_from_captions, recall_at_k
from dodo.models.registry import InitState
from dodo.tasks import Task
from dodo.tasks.contrastive import ContrastiveTask

_ABOVE = 1.0e4  # lifts the re-ranked top k above every cosine similarity (|cos| <= 1)


def build_task(cfg: JobConfig, init: InitState | None = None) -> Task:
    return VlmoRetrievalTask(cfg, init)


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
