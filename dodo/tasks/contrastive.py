"""Contrastive image-text training (CLIP, VLMo) scored by retrieval, zero-shot and kNN, in
distribution (ID) and under a synthetic distribution shift (OOD).

The shift: the "colour shape" combinations of ``eval.ood_holdout`` never appear in training;
ID metrics use held-out images of the other combinations, OOD metrics held-out images of the
held-out ones. Captions are the texts; identical captions count as positives of each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dodo.adapters.r_adapter import RAdapterLinear
from dodo.config.schema import JobConfig
from dodo.data import build_datasets
from dodo.data.collate import CaptionCollator
from dodo.data.synthetic import COLOURS, SHAPES, SyntheticShapes, caption_attributes
from dodo.data.tokenizer import load_tokenizer
from dodo.eval.knn import knn_accuracy
from dodo.eval.retrieval import positives_from_captions, recall_at_k
from dodo.eval.zeroshot import class_embeddings, zero_shot_accuracy
from dodo.models import build_model
from dodo.tasks import Task

CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 18 "colour shape" classes


def combo(caption: str) -> str:
    a = caption_attributes(caption)
    return f"{a['colour']} {a['shape']}"


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def split_by_combo(ds: Dataset, holdout: set[str], keep_held: bool, limit: int | None = None) -> Subset:
    out = []
    for i in range(len(ds)):
        if (combo(ds[i].caption) in holdout) == keep_held:
            out.append(i)
            if limit is not None and len(out) == limit:
                break
    return Subset(ds, out)


class ContrastiveTask(Task):
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        mask_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.unk_token) if self.tokenizer.unk_token else None
        self.model = build_model(cfg.model, vocab_size=len(self.tokenizer),
                                 eos_token_id=self.tokenizer.eos_token_id, mask_token_id=mask_id)
        for m in self.model.modules():  # R-Adapter's EMA: once per optimizer step
            if isinstance(m, RAdapterLinear):
                m.ema_every = cfg.train.grad_accum
        train, evals = build_datasets(cfg.data)
        self.holdout = set(cfg.eval.ood_holdout)
        if self.holdout:
            train = split_by_combo(train, self.holdout, keep_held=False)
            evals = split_by_combo(evals, self.holdout, keep_held=False)
            # OOD images: the held-out split's samples of held-out combinations, from a
            # separate stream (seed + 1) so they do not repeat the ID eval images.
            pool = SyntheticShapes("eval", 2 * cfg.eval.num_ood * 18 // max(1, len(self.holdout)),
                                   cfg.data.image_size, cfg.data.seed + 1)
            self.ood_set: Dataset | None = split_by_combo(pool, self.holdout, keep_held=True, limit=cfg.eval.num_ood)
        else:
            self.ood_set = None
        self.train_set, self.eval_set = train, evals
        self.collate = CaptionCollator(self.tokenizer, cfg.data.max_caption_tokens)

    # ---------------------------------------------------------------- embeddings

    @torch.no_grad()
    def embed(self, model: nn.Module, ds: Dataset, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(image embeddings (N, D), text embeddings (N, D), captions)."""
        device = next(model.parameters()).device
        imgs, txts, caps = [], [], []
        for lo in range(0, len(ds), batch_size):
            batch = self.collate([ds[i] for i in range(lo, min(len(ds), lo + batch_size))])
            imgs.append(model.encode_image(batch["images"].to(device)).float().cpu())
            txts.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
            caps += batch["captions"]
        return torch.cat(imgs), torch.cat(txts), caps

    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        ids, mask = self.collate.token_ids(texts)
        return model.encode_text(ids.to(device), mask.to(device)).float().cpu()

    def split_metrics(self, model: nn.Module, ds: Dataset, tag: str) -> dict[str, float]:
        img, txt, caps = self.embed(model, ds)
        # Unique captions as the text gallery: every image with that caption is a positive.
        texts = sorted(set(caps))
        txt_unique = torch.stack([txt[caps.index(t)] for t in texts])
        r = recall_at_k(img @ txt_unique.T, positives_from_captions(caps, texts), self.cfg.eval.retrieval_ks)
        classes = CLASSES
        with torch.no_grad():
            cls = class_embeddings(lambda t: self.encode_texts(model, t), classes, self.cfg.eval.templates)
        labels = torch.tensor([classes.index(combo(c)) for c in caps])
        zs = zero_shot_accuracy(img, cls, labels, (1, 5))
        out = {f"eval.{tag}.{k}": v for k, v in r.items()}
        out[f"eval.{tag}.zeroshot_top1"] = zs["top1"]
        return out

    # ---------------------------------------------------------------- Task API

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Every rank computes the same (small) metrics; no reduction needed."""
        was = model.training
        model.eval()
        with torch.no_grad():
            loss_batch = self.collate([self.eval_set[i] for i in range(min(len(self.eval_set), 64))])
            device = next(model.parameters()).device
            loss = float(model(**{k: v.to(device) for k, v in loss_batch.items() if torch.is_tensor(v)}))
            out = {"eval.loss": loss, **self.split_metrics(model, self.eval_set, "id")}
            if self.ood_set is not None:
                out.update(self.split_metrics(model, self.ood_set, "ood"))
        model.train(was)
        return out

    def knn(self, model: nn.Module) -> float:
        """kNN top-1 on image features: the train bank's "colour shape" labels, ID eval images."""
        bank = Subset(self.train_set, list(range(min(len(self.train_set), self.cfg.eval.knn_bank))))
        was = model.training
        model.eval()
        b_img, _, b_caps = self.embed(model, bank)
        e_img, _, e_caps = self.embed(model, self.eval_set)
        model.train(was)
        to_label = lambda caps: torch.tensor([CLASSES.index(combo(c)) for c in caps])  # noqa: E731
        return knn_accuracy(b_img, to_label(b_caps), e_img, to_label(e_caps), len(CLASSES),
                            self.cfg.eval.knn_k, self.cfg.eval.knn_temperature)

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        acc = self.knn(model)
        lines = [f"kNN (k={self.cfg.eval.knn_k}, T={self.cfg.eval.knn_temperature}) top-1 on ID images: {acc:.3f}"]
        return {"eval.id.knn_accuracy": acc}, lines

    def run_eval(self, model: nn.Module, name: str, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """`dodo eval RUN --task NAME`: retrieval | zeroshot | knn | wise."""
        model.eval()
        if name in ("retrieval", "zeroshot"):
            m = self.evaluate(model, 64, 0, 1)
            keys = [k for k in m if ("zeroshot" in k) == (name == "zeroshot") and k != "eval.loss"]
            res = {k: m[k] for k in keys}
            return res, [f"  {k:28} {v:.3f}" for k, v in res.items()]
        if name == "knn":
            acc = self.knn(model)
            return {"eval.id.knn_accuracy": acc}, [f"  eval.id.knn_accuracy         {acc:.3f}"]
        if name == "wise":
            from dodo.eval.wise import markdown_table, wise_curve, write_curve

            def metrics(m: nn.Module) -> dict[str, float]:
                full = self.evaluate(m, 64, 0, 1)
                return {k.removeprefix("eval."): v for k, v in full.items()
                        if k.endswith(("r_mean", "zeroshot_top1"))}
            rows = wise_curve(model, metrics, self.cfg.eval.wise_alphas)
            files = write_curve(rows, out_dir)
            return {"rows": rows}, [markdown_table(rows), f"  curve: {files['png']}"]
        raise ValueError(f"unknown eval task {name!r} for a contrastive run; choose retrieval, zeroshot, knn or wise")
