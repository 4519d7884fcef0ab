"""The language adapter's task: train on parallel text, score the held-out pairs, feed the suites.

Batches: ``src_ids`` / ``src_mask`` (B, S), the English side tokenised exactly as the CLIP
family tokenises captions (``CaptionCollator.token_ids``: CLIP's tokenizer, one EOS, padded);
``tgt_ids`` / ``tgt_mask`` (B, T), the target-language side by the encoder's own tokenizer
([CLS] ... [SEP], padded, truncated at ``model.lang_adapter.max_tokens``).

Held-out metrics (every rank, the same): ``eval.loss`` (the training distance), ``eval.cosine``
(mean cosine of student and teacher features) and translation retrieval over the held-out
pairs, ``eval.pair.src2tgt_rK`` / ``tgt2src_rK`` / ``r_mean`` (a pair's translation is its one
positive). Zero-shot and retrieval with target-language class names, templates and captions
run as ``eval.suites`` through ``encode_images`` (CLIP's frozen vision tower) and
``encode_texts`` (the target-language path), e.g. ``classnames: clip_benchmark_cn:cifar10``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dodo.config.schema import JobConfig
from dodo.data.collate import CaptionCollator
from dodo.data.ingest.parallel import Pair, ParallelPairs
from dodo.data.manifest import CacheError
from dodo.data.tokenizer import load_tokenizer
from dodo.eval.retrieval import recall_at_k
from dodo.models.registry import InitState
from dodo.tasks import Task, build_family_model
from dodo.tasks.encoders import image_features

EVAL_BATCH = 128


def build_task(cfg: JobConfig, init: InitState | None = None) -> "LangAdapterTask":
    return LangAdapterTask(cfg, init)


class ParallelCollator:
    """Pairs -> the model's four id / mask tensors (module docstring). Picklable (workers)."""

    def __init__(self, src_tokenizer: Any, src_max: int, tgt_tokenizer: Any, tgt_max: int):
        self.src = CaptionCollator(src_tokenizer, src_max)
        self.tgt_tokenizer, self.tgt_max = tgt_tokenizer, tgt_max
        self.image_mean, self.image_std = self.src.image_mean, self.src.image_std  # CLIP's image side

    def tgt_ids(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Target-language texts -> (input_ids, attention_mask), both (B, T) long."""
        enc = self.tgt_tokenizer(list(texts), padding=True, truncation=True, max_length=self.tgt_max,
                                 return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def __call__(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        src_ids, src_mask = self.src.token_ids([p.src for p in pairs])
        tgt_ids, tgt_mask = self.tgt_ids([p.tgt for p in pairs])
        return {"src_ids": src_ids, "src_mask": src_mask, "tgt_ids": tgt_ids, "tgt_mask": tgt_mask,
                "src": [p.src for p in pairs], "tgt": [p.tgt for p in pairs], "keys": [p.key for p in pairs]}


def parallel_datasets(d) -> tuple[ParallelPairs, ParallelPairs]:
    """(train, held-out) pairs: data.eval_cache, or the last data.num_eval pairs of data.train_cache."""
    if d.eval_cache:
        return ParallelPairs(d.train_cache, d.verify), ParallelPairs(d.eval_cache, d.verify)
    n = len(ParallelPairs(d.train_cache, d.verify))
    if d.num_eval >= n:
        raise CacheError(f"data.num_eval={d.num_eval} leaves no training pairs in {d.train_cache} ({n} pairs); "
                         "lower data.num_eval or set data.eval_cache")
    return ParallelPairs(d.train_cache, "none", 0, n - d.num_eval), ParallelPairs(d.train_cache, "none", n - d.num_eval)


class LangAdapterTask(Task):
    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        from transformers import AutoTokenizer

        self.cfg = cfg
        a = cfg.model.lang_adapter
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)  # CLIP's (English) tokenizer
        self.tgt_tokenizer = AutoTokenizer.from_pretrained(a.tokenizer or a.encoder_path, local_files_only=True)
        self.model = build_family_model(cfg.model, self.tokenizer, init)
        self.train_set, self.eval_set = parallel_datasets(cfg.data)
        self.collate = ParallelCollator(self.tokenizer, cfg.data.max_caption_tokens, self.tgt_tokenizer, a.max_tokens)

    # ---------------------------------------------------------------- the suites' hooks

    @torch.no_grad()
    def encode_images(self, model: nn.Module, images: Any) -> torch.Tensor:
        """uint8 (B, H, W, 3) or normalised float (B, 3, H, W) -> (B, D) unit norm (CLIP's vision tower)."""
        return image_features(model, images, self.collate)

    @torch.no_grad()
    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """Target-language captions / class prompts -> (B, D) unit norm, through encoder + adapter."""
        device = next(model.parameters()).device
        ids, mask = self.collate.tgt_ids(texts)
        return model.encode_text(ids.to(device), mask.to(device)).float().cpu()

    # ---------------------------------------------------------------- Task API

    @torch.no_grad()
    def pair_metrics(self, model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        students, teachers, dist_sum = [], [], 0.0
        for lo in range(0, len(self.eval_set), EVAL_BATCH):
            batch = self.collate([self.eval_set[i] for i in range(lo, min(len(self.eval_set), lo + EVAL_BATCH))])
            s = model.student(batch["tgt_ids"].to(device), batch["tgt_mask"].to(device)).float()
            t = model.teacher(batch["src_ids"].to(device), batch["src_mask"].to(device)).float()
            dist_sum += float(model.distance(s, t)) * len(s)
            students.append(s.cpu())
            teachers.append(t.cpu())
        s, t = torch.cat(students), torch.cat(teachers)  # (N, D) each
        sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
        r = recall_at_k(tn @ sn.T, torch.eye(len(s), dtype=torch.bool), self.cfg.eval.retrieval_ks)
        names = {"tr": "src2tgt", "ir": "tgt2src"}  # rows: English (teacher), columns: target language
        out = {"eval.loss": dist_sum / len(s), "eval.cosine": float((sn * tn).sum(-1).mean())}
        out.update({f"eval.pair.{names.get(k[:2], k[:2])}{k[2:]}" if k != "r_mean" else "eval.pair.r_mean": v
                    for k, v in r.items()})
        return out

    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """Every rank computes the same (small) metrics; no reduction needed."""
        was = model.training
        model.eval()
        try:
            return self.pair_metrics(model)
        finally:
            model.train(was)

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        m = self.evaluate(model, EVAL_BATCH, 0, 1)
        return {}, [f"held-out pairs ({len(self.eval_set)}): distance ({self.cfg.model.lang_adapter.loss}) "
                    f"{m['eval.loss']:.4f}, cosine {m['eval.cosine']:.3f}, translation retrieval r_mean "
                    f"{m['eval.pair.r_mean']:.3f}"]

    def run_eval(self, model: nn.Module, name: str, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """`dodo eval RUN --task NAME`: retrieval = translation retrieval on the held-out pairs;
        zero-shot / image retrieval in the target language are the job's eval.suites."""
        if name == "retrieval":
            m = self.evaluate(model, EVAL_BATCH, 0, 1)
            res = {k: v for k, v in m.items() if k.startswith("eval.pair.")}
            return res, [f"  {k:28} {v:.3f}" for k, v in res.items()]
        if name in ("zeroshot", "knn"):
            return {}, [f"  {name}: skipped; a lang_adapter run scores it as an eval.suites entry with "
                        "target-language classnames / templates (summary.json)"]
        raise ValueError(f"unknown eval task {name!r} for a lang_adapter run; choose retrieval")
