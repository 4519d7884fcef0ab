"""Contrastive image-text training (CLIP, VLMo: the dual-encoder families), scored by retrieval
on held-out data; on the synthetic shapes also by zero-shot and kNN over the "colour shape"
classes, in distribution (ID) and under the colour-shape shift (OOD; dodo/tasks/shapes.py).

For the evaluation suites (INTERFACES.md section 4) the task exposes
``encode_images(model, images) -> (B, D)`` and ``encode_texts(model, texts) -> (B, D)``, unit
norm. The periodic held-out retrieval counts a caption's own image as its positive (image ids:
``dodo.eval.retrieval.recall_by_image_ids``, R@K both ways as the papers do), reported as
``eval.<split>.tr_rK`` (image -> text, "i2t"), ``ir_rK`` (text -> image, "t2i") and ``r_mean``.
On the synthetic shapes data (the ``shapes`` suite's scoring, dodo/tasks/shapes.py) identical
captions of different images count as positives of each other, plus zero-shot over its classes.
The shapes module is imported only when the data is the synthetic shapes (their samples carry
its ``attrs``), so a run on real data never loads the generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from dodo.adapters.r_adapter import RAdapterLinear
from dodo.config.schema import JobConfig
from dodo.data import build_datasets
from dodo.data.collate import CaptionCollator
from dodo.data.tokenizer import load_tokenizer
from dodo.eval.knn import knn_accuracy
from dodo.eval.retrieval import recall_by_image_ids
from dodo.models.registry import InitState
from dodo.tasks import Task, build_family_model
from dodo.tasks.encoders import image_features


class ContrastiveTask(Task):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.model = build_family_model(cfg.model, self.tokenizer, init)
        for m in self.model.modules():  # R-Adapter's EMA: once per optimizer step
            if isinstance(m, RAdapterLinear):
                m.ema_every = cfg.train.grad_accum
        train, evals = build_datasets(cfg.data)
        if getattr(getattr(cfg.model, "clip", None), "text_source", "captions") == "class_templates":
            from dodo.models.clip.class_text import wrap_datasets  # classification fine-tuning
            train, evals = wrap_datasets(cfg, train, evals)
        self.ood_set: Dataset | None = None
        if cfg.eval.ood_holdout and len(train) and _is_shapes([train[0]]):  # the shapes suite's colour-shape shift (synthetic data only)
            from dodo.tasks import shapes
            train, evals, self.ood_set = shapes.ood_split(cfg, train, evals)
        self.train_set, self.eval_set = train, evals
        self.collate = CaptionCollator(self.tokenizer, cfg.data.max_caption_tokens)

    # ---------------------------------------------------------------- encoders (eval suites)

    @torch.no_grad()
    def encode_images(self, model: nn.Module, images: Any) -> torch.Tensor:
        """uint8 (B, H, W, 3) or normalised float (B, 3, H, W) -> (B, D) float, unit norm (CPU)."""
        return image_features(model, images, self.collate)

    @torch.no_grad()
    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Captions / class prompts -> (B, D) float, unit norm (CPU)."""
        device = next(model.parameters()).device
        ids, mask = self.collate.token_ids(texts)
        return model.encode_text(ids.to(device), mask.to(device)).float().cpu()

    @torch.no_grad()
    def embed(self, model: nn.Module, ds: Dataset, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(image embeddings (N, D), text embeddings (N, D), captions) of a dataset."""
        device = next(model.parameters()).device
        imgs, txts, caps = [], [], []
        for lo in range(0, len(ds), batch_size):
            batch = self.collate([ds[i] for i in range(lo, min(len(ds), lo + batch_size))])
            imgs.append(model.encode_image(batch["images"].to(device)).float().cpu())
            txts.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
            caps += batch["captions"]
        return torch.cat(imgs), torch.cat(txts), caps

    def split_metrics(self, model: nn.Module, ds: Dataset, tag: str) -> dict[str, float]:
        """Held-out retrieval R@K (+ zero-shot on the shapes data) as ``eval.<tag>.*``."""
        img, txt, caps = self.embed(model, ds)  # (N, D) each: one row per caption sample
        ks = self.cfg.eval.retrieval_ks
        if _is_shapes([ds[i] for i in range(min(len(ds), 16))]):
            out = _shapes_metrics(self, model, ds, img, txt, caps, ks)
        else:
            # Gallery: each image once (the first sample of its image id), every caption;
            # a sample without an id (-1) is its own image. Positives by image, not by text.
            ids = [getattr(ds[i], "image_id", -1) for i in range(len(ds))] if not hasattr(ds, "image_ids") \
                else ds.image_ids().tolist()
            row: dict[int, int] = {}
            owner = [row.setdefault(iid if iid >= 0 else -(i + 1), len(row)) for i, iid in enumerate(ids)]
            first = sorted({o: i for i, o in reversed(list(enumerate(owner)))}.items())
            gallery = img[torch.tensor([i for _, i in first])]  # (I, D)
            r = recall_by_image_ids(gallery, txt, owner, ks)
            # Stable key names: tr = image -> text (i2t), ir = text -> image (t2i).
            out = {("tr" + k[3:] if k.startswith("i2t") else "ir" + k[3:] if k.startswith("t2i") else k): v
                   for k, v in r.items()}
        return {f"eval.{tag}.{k}": v for k, v in out.items()}

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

    def knn(self, model: nn.Module) -> float | None:
        """kNN top-1 on image features, the train bank against the ID eval images; labels from
        the data (Sample.label), or the shapes classes; None when the data has neither."""
        bank = Subset(self.train_set, list(range(min(len(self.train_set), self.cfg.eval.knn_bank))))
        b_samples = [bank[i] for i in range(len(bank))]
        e_samples = [self.eval_set[i] for i in range(len(self.eval_set))]
        if all(s.label >= 0 for s in b_samples + e_samples):
            b_lab = torch.tensor([s.label for s in b_samples])
            e_lab = torch.tensor([s.label for s in e_samples])
        elif _is_shapes(b_samples + e_samples):
            from dodo.tasks import shapes
            b_lab = torch.tensor(shapes.labels(b_samples))
            e_lab = torch.tensor(shapes.labels(e_samples))
        else:
            return None
        was = model.training
        model.eval()
        b_img, _, _ = self.embed(model, bank)
        e_img, _, _ = self.embed(model, self.eval_set)
        model.train(was)
        n_classes = int(max(b_lab.max(), e_lab.max())) + 1
        return knn_accuracy(b_img, b_lab, e_img, e_lab, n_classes, self.cfg.eval.knn_k, self.cfg.eval.knn_temperature)

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        acc = self.knn(model)
        if acc is None:
            return {}, ["kNN: skipped, the data has no labels"]
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
            if acc is None:
                return {}, ["  kNN: skipped, the data has no labels"]
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


def _is_shapes(samples: list) -> bool:
    """Synthetic shapes samples carry the generator's ``attrs`` (no other source sets them): only
    then is the shapes module (and through it the generator) imported."""
    if not samples or not all(getattr(s, "attrs", None) for s in samples):
        return False
    from dodo.tasks import shapes
    return shapes.is_shapes(samples)


def _shapes_metrics(task: ContrastiveTask, model: nn.Module, ds: Dataset, img: torch.Tensor, txt: torch.Tensor,
                    caps: list[str], ks) -> dict[str, float]:
    """The shapes suite's held-out scoring: unique captions as the text gallery (every image with
    that caption is a positive) and zero-shot over its "colour shape" classes."""
    from dodo.eval.retrieval import positives_from_captions, recall_at_k
    from dodo.eval.zeroshot import class_embeddings, zero_shot_accuracy
    from dodo.tasks import shapes

    texts = sorted(set(caps))
    txt_unique = torch.stack([txt[caps.index(t)] for t in texts])  # (T, D)
    out = recall_at_k(img @ txt_unique.T, positives_from_captions(caps, texts), ks)
    samples = [ds[i] for i in range(len(ds))]
    cls = class_embeddings(lambda t: task.encode_texts(model, t), shapes.suite.classes(), task.cfg.eval.templates)
    out["zeroshot_top1"] = zero_shot_accuracy(img, cls, torch.tensor(shapes.labels(samples)), (1, 5))["top1"]
    return out
