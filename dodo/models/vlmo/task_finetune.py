"""VLMo's fine-tuning tasks (tasks layer): VQA v2 and NLVR2 on the fusion encoder's heads.

``model.vlmo.stage: vqa`` trains the answer classifier (heads.VqaHead) with BCE on the soft
scores of the training cache's answer vocabulary; held out: ``eval.vqa_score`` (the soft score
min(1, n / 3) of the top answer, averaged over questions), per answer type
(``eval.vqa_score.yes_no`` / ``number`` / ``other``), and ``eval.vqa_accuracy``, the official
metric (leave-one-annotator-out; dodo/data/ingest/vqa_answers.py). ``model.vlmo.stage: nlvr2``
trains heads.Nlvr2Head (one statement fused with each image, "pair" setting) with
cross-entropy; held out: ``eval.nlvr2_accuracy``. Both start from an earlier stage's weights
(``model.vlmo.init_from``), train every parameter, and read caches built ``--from vqa`` /
``--from nlvr2`` (dodo/data/finetune.py joins the questions to the images).

``dodo eval RUN --task predict`` writes the answers for ``model.vlmo.predict_cache`` (e.g. VQA
test-dev, cached without answers; default data.eval_cache) in the evaluation servers' formats:
<run>/eval/vqa_predictions.json ([{"question_id", "answer"}]) or nlvr2_predictions.csv
(``identifier,True|False``).

The held-out pass is split across ranks (rank r takes items r, r + W, ...) and summed with one
all-reduce, so a large validation split (VQA val2014: 214k questions) costs 1 / W per rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dodo.config.schema import JobConfig
from dodo.data.collate import CaptionCollator
from dodo.data.dataset import _check_matches
from dodo.data.finetune import Nlvr2Statements, QaCollator, VqaQuestions
from dodo.data.tokenizer import load_tokenizer
from dodo.models.registry import InitState
from dodo.models.vlmo.heads import vqa_loss
from dodo.rundir import write_atomic
from dodo.tasks import Task, build_family_model

ANSWER_TYPES = ("yes/no", "number", "other")  # VQA v2's answer_type values


class FinetuneTask(Task):
    stage = ""

    def __init__(self, cfg: JobConfig, init: InitState | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        self.train_set, self.eval_set = self.datasets(cfg)  # first: VQA checks vqa_answers against the cache
        self.model = build_family_model(cfg.model, self.tokenizer, init)
        for ds, key in ((self.train_set, "train_cache"), (self.eval_set, "eval_cache")):
            _check_matches(cfg.data, ds.images, key)
            if len(ds) == 0:
                raise ValueError(f"data.{key}={getattr(cfg.data, key)} has no {self.stage} item with its image(s) "
                                 "(every image was a bad sample? see its bad_samples.jsonl)")
        self.collate = QaCollator(CaptionCollator(self.tokenizer, cfg.data.max_caption_tokens), self.stage)
        self.last: dict[str, float] = {}

    def datasets(self, cfg: JobConfig) -> tuple[Any, Any]:
        raise NotImplementedError

    def batch_sums(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        """(S,) float64 sums over the batch: loss * rows, rows, then the task's own."""
        raise NotImplementedError

    def metrics(self, sums: list[float]) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
        """The held-out metrics; every rank takes its share and the sums are all-reduced."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        mine = list(range(rank, len(self.eval_set), world_size))
        total: torch.Tensor | None = None
        for lo in range(0, len(mine), batch_size):
            sums = self.batch_sums(model, self.collate([self.eval_set[i] for i in mine[lo:lo + batch_size]]), device)
            total = sums if total is None else total + sums
        if total is None:  # more ranks than items: this rank adds zeros
            total = self.batch_sums(model, self.collate([self.eval_set[0]]), device) * 0
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            total = total.to(device)
            dist.all_reduce(total)
        model.train(was)
        self.last = self.metrics(total.cpu().tolist())
        return self.last

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        """Rank 0: the final held-out pass's numbers (already in summary.json's final metrics)."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lines = [f"  {k:36} {v:.4f}" for k, v in self.last.items() if k != "eval.loss"]
        return {}, [f"{self.stage} on {len(self.eval_set)} held-out items ({self.cfg.data.eval_cache}), "
                    f"{trainable:,} trainable parameters:", *lines]

    # ---------------------------------------------------------------- predictions (`dodo eval --task predict`)

    def predict_set(self, path: str) -> Any:
        raise NotImplementedError

    def answers(self, model: nn.Module, batch: dict, device: torch.device) -> list[str]:
        raise NotImplementedError

    def write_predictions(self, ds: Any, answers: list[str], out_dir: Path) -> Path:
        raise NotImplementedError

    @torch.no_grad()
    def run_eval(self, model: nn.Module, name: str, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
        """`dodo eval RUN --task predict`: the model's answer to every item of
        ``model.vlmo.predict_cache`` (default: data.eval_cache), in the evaluation server's format."""
        if name != "predict":
            raise ValueError(f"a VLMo {self.stage} run has one `dodo eval` task, predict (its held-out metric "
                             "is in summary.json)")
        path = self.cfg.model.vlmo.predict_cache or self.cfg.data.eval_cache
        ds = self.predict_set(path)
        device = next(model.parameters()).device
        model.eval()
        answers: list[str] = []
        for lo in range(0, len(ds), 64):
            batch = self.collate([ds[i] for i in range(lo, min(len(ds), lo + 64))])
            answers += self.answers(model, batch, device)
        file = self.write_predictions(ds, answers, out_dir)
        return ({"cache": str(path), "items": len(answers), "file": str(file)},
                [f"  {len(answers)} {self.stage} predictions for {path} -> {file}"])


class VqaTask(FinetuneTask):
    stage = "vqa"

    def datasets(self, cfg: JobConfig) -> tuple[VqaQuestions, VqaQuestions]:
        d = cfg.data
        targets = cfg.model.vlmo.vqa_targets
        train = VqaQuestions(d.train_cache, None, d.verify, d.decoder, targets)
        if len(train.answers) != cfg.model.vlmo.vqa_answers:  # the twin of the submit-time check
            raise ValueError(f"model.vlmo.vqa_answers={cfg.model.vlmo.vqa_answers}, but {d.train_cache} has "
                             f"{len(train.answers)} answers; set model.vlmo.vqa_answers={len(train.answers)}")
        return train, VqaQuestions(d.eval_cache, train.answers, d.verify, d.decoder, targets)

    def batch_sums(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        logits = model.vqa_logits(batch["images"].to(device), batch["input_ids"].to(device),
                                  batch["attention_mask"].to(device)).float().cpu()  # (B, answers)
        scores = batch["vqa_scores"]  # (B, answers) the training targets (model.vlmo.vqa_targets)
        rows = len(scores)
        pick = logits.argmax(1, keepdim=True)  # (B, 1) the top answer
        top = torch.from_numpy(batch["vqa_soft"]).gather(1, pick).squeeze(1).double()  # (B,) its soft score
        official = torch.from_numpy(batch["vqa_official"]).gather(1, pick).double()  # (B, 1) its official accuracy
        out = [float(vqa_loss(logits, scores)) * rows, rows, float(top.sum()), float(official.sum())]
        for t in ANSWER_TYPES:
            sel = torch.tensor([k == t for k in batch["kinds"]])
            out += [float(top[sel].sum()), float(sel.sum())]
        return torch.tensor(out, dtype=torch.float64)

    def predict_set(self, path: str) -> VqaQuestions:
        d = self.cfg.data
        return VqaQuestions(path, self.train_set.answers, d.verify, d.decoder)

    def answers(self, model: nn.Module, batch: dict, device: torch.device) -> list[str]:
        logits = model.vqa_logits(batch["images"].to(device), batch["input_ids"].to(device),
                                  batch["attention_mask"].to(device))  # (B, answers)
        return [self.train_set.answers[j] for j in logits.argmax(1).tolist()]

    def write_predictions(self, ds: VqaQuestions, answers: list[str], out_dir: Path) -> Path:
        """VQA's result format: [{"question_id": int, "answer": str}] (EvalAI's test-dev upload)."""
        file = out_dir / "vqa_predictions.json"
        rows = [{"question_id": q["question_id"], "answer": a} for q, a in zip(ds.questions, answers)]
        write_atomic(file, json.dumps(rows) + "\n")
        return file

    def metrics(self, sums: list[float]) -> dict[str, float]:
        n = max(sums[1], 1.0)
        out = {"eval.loss": sums[0] / n, "eval.vqa_score": sums[2] / n, "eval.vqa_accuracy": sums[3] / n}
        for j, t in enumerate(ANSWER_TYPES):
            s, c = sums[4 + 2 * j], sums[5 + 2 * j]
            if c:
                out[f"eval.vqa_score.{t.replace('/', '_')}"] = s / c
        return out

    def final_report(self, model: nn.Module) -> tuple[dict[str, float], list[str]]:
        extra, lines = super().final_report(model)
        ceiling = self.eval_set.ceiling()
        return {**extra, "eval.vqa_ceiling": ceiling}, lines + [
            f"  the {len(self.train_set.answers)} answers of the training vocabulary reach at most "
            f"{ceiling:.4f} on these questions (eval.vqa_ceiling); {self.eval_set.dropped} questions "
            "without their image were left out"]


class Nlvr2Task(FinetuneTask):
    stage = "nlvr2"

    def datasets(self, cfg: JobConfig) -> tuple[Nlvr2Statements, Nlvr2Statements]:
        d = cfg.data
        return (Nlvr2Statements(d.train_cache, d.verify, d.decoder), Nlvr2Statements(d.eval_cache, d.verify, d.decoder))

    def batch_sums(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        logits = model.nlvr2_logits(batch["images"].to(device), batch["images_2"].to(device),
                                    batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        labels = batch["labels"]  # (B,)
        rows = len(labels)
        loss = float(F.cross_entropy(logits, labels)) * rows
        return torch.tensor([loss, rows, float((logits.argmax(1) == labels).sum())], dtype=torch.float64)

    def metrics(self, sums: list[float]) -> dict[str, float]:
        n = max(sums[1], 1.0)
        return {"eval.loss": sums[0] / n, "eval.nlvr2_accuracy": sums[2] / n}

    def predict_set(self, path: str) -> Nlvr2Statements:
        return Nlvr2Statements(path, self.cfg.data.verify, self.cfg.data.decoder)

    def answers(self, model: nn.Module, batch: dict, device: torch.device) -> list[str]:
        logits = model.nlvr2_logits(batch["images"].to(device), batch["images_2"].to(device),
                                    batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, 2)
        return ["True" if j == 1 else "False" for j in logits.argmax(1).tolist()]

    def write_predictions(self, ds: Nlvr2Statements, answers: list[str], out_dir: Path) -> Path:
        """NLVR2's predictions file: CSV rows ``identifier,prediction`` (True / False)."""
        file = out_dir / "nlvr2_predictions.csv"
        write_atomic(file, "".join(f"{s['identifier']},{a}\n" for s, a in zip(ds.statements, answers)))
        return file
