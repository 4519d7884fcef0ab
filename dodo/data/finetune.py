"""Datasets of VLMo's fine-tuning tasks: VQA v2 questions and NLVR2 statements, each joined by
image key to the images of an image-only cache built ``--from vqa`` / ``--from nlvr2``.

A cache holds every image once (dodo/data/ingest/vqa.py, nlvr2.py); its table (questions.json /
statements.json) lists the questions or statements with their targets. Index ``i`` of these
datasets is the i-th question (statement) whose image(s) the cache holds; those whose image
was a bad sample (reported in the cache's bad_samples.jsonl) are left out and counted in
``dropped``.

VQA targets are soft scores over an answer vocabulary: the TRAINING cache's (``answers``), also
for a held-out cache, so that train and eval score the same classes; a held-out answer outside
it scores 0 whatever the model says (``ceiling`` is the best score reachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dodo.data.dataset import CachedDataset
from dodo.data.ingest import nlvr2 as nlvr2_ingest
from dodo.data.ingest import read_table
from dodo.data.ingest import vqa as vqa_ingest
from dodo.data.ingest.vqa_answers import best_possible, score_vector
from dodo.data.manifest import CacheError


@dataclass
class QaSample:
    """One question (VQA) or statement (NLVR2) with its image(s) and target."""

    image: np.ndarray  # (H, W, 3) uint8; NLVR2: the left image
    text: str  # the question / the statement
    key: str  # question id / NLVR2 identifier
    scores: Optional[np.ndarray] = None  # VQA: (answers,) float32 training targets; None unannotated
    soft: Optional[np.ndarray] = None  # VQA: (answers,) min(1, n / 3) (eval.vqa_score)
    official: Optional[np.ndarray] = None  # VQA: (answers,) the official accuracy (eval.vqa_accuracy)
    image_2: Optional[np.ndarray] = None  # NLVR2: the right image
    label: int = -1  # NLVR2: 1 true, 0 false, -1 unlabelled
    kind: str = ""  # VQA: the answer type (yes/no, number, other)


def _image_index(images: CachedDataset) -> dict[str, int]:
    """Image key -> sample index of an image-only cache (one sample per image row)."""
    index: dict[str, int] = {}
    for k, reader in enumerate(images.readers):
        reader.open()
        for j, key in enumerate(reader.keys):
            index[key] = images.rows[k] + j
    return index


def _open(root: str | Path, kind: str, verify: str, decoder: str) -> CachedDataset:
    images = CachedDataset(root, verify, decoder=decoder)
    if images.manifest.source.get("kind") != kind:
        raise CacheError(f"data cache {root} was not built --from {kind} (source "
                         f"{images.manifest.source.get('kind')!r}); build it with `dodo data cache ... --from {kind}`")
    return images


class VqaQuestions(torch.utils.data.Dataset):
    """The questions of a ``--from vqa`` cache, scored over ``answers`` (None: the cache's own).
    ``targets``: what ``scores`` (the training targets) hold, "soft" min(1, n / 3) or "official"
    (the official accuracy); ``official`` always holds the official accuracy (evaluation)."""

    def __init__(self, root: str | Path, answers: Optional[Sequence[str]] = None, verify: str = "checksum",
                 decoder: str = "auto", targets: str = "soft") -> None:
        self.targets = targets
        self.images = _open(root, vqa_ingest.KIND, verify, decoder)
        table = read_table(self.images.root, vqa_ingest.TABLE)
        self.answers = list(table["answers"] if answers is None else answers)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        where = _image_index(self.images)
        self.questions = [q for q in table["questions"] if q["image"] in where]
        self.rows = [where[q["image"]] for q in self.questions]
        self.dropped = len(table["questions"]) - len(self.questions)
        self.annotated = all("answers" in q for q in self.questions)

    def __len__(self) -> int:
        return len(self.questions)

    def ceiling(self) -> float:
        """The VQA score of an oracle restricted to the vocabulary, on these questions."""
        return best_possible([q["answers"] for q in self.questions if "answers" in q], self.answer_index)

    def __getitem__(self, i: int) -> QaSample:
        q = self.questions[i]
        soft = official = None
        if "answers" in q:
            soft = np.asarray(score_vector(q["answers"], self.answer_index, len(self.answers)), np.float32)
            official = np.asarray(score_vector(q["answers"], self.answer_index, len(self.answers), True), np.float32)
        return QaSample(image=self.images[self.rows[i]].image, text=q["question"], key=str(q["question_id"]),
                        scores=official if self.targets == "official" else soft, soft=soft, official=official,
                        kind=q.get("answer_type", ""))


class Nlvr2Statements(torch.utils.data.Dataset):
    """The statements of a ``--from nlvr2`` cache whose two images the cache holds."""

    def __init__(self, root: str | Path, verify: str = "checksum", decoder: str = "auto") -> None:
        self.images = _open(root, nlvr2_ingest.KIND, verify, decoder)
        table = read_table(self.images.root, nlvr2_ingest.TABLE)
        where = _image_index(self.images)
        self.statements = [s for s in table["statements"] if s["left"] in where and s["right"] in where]
        self.rows = [(where[s["left"]], where[s["right"]]) for s in self.statements]
        self.dropped = len(table["statements"]) - len(self.statements)
        self.labelled = all(s["label"] >= 0 for s in self.statements)

    def __len__(self) -> int:
        return len(self.statements)

    def __getitem__(self, i: int) -> QaSample:
        s, (left, right) = self.statements[i], self.rows[i]
        return QaSample(image=self.images[left].image, image_2=self.images[right].image, text=s["sentence"],
                        key=s["identifier"], label=int(s["label"]))


class QaCollator:
    """QaSamples -> model inputs: ``images`` (and ``images_2``) (B, 3, H, W) float32 normalised,
    ``input_ids`` / ``attention_mask`` (B, T), and the targets ``vqa_scores`` (B, answers) float32
    or ``labels`` (B,) long. Images leave here normalised (the device step leaves float tensors
    as they are), since the device step would normalise ``images`` only, not ``images_2``."""

    def __init__(self, base, task: str):  # base: dodo.data.collate.CaptionCollator
        self.base, self.task = base, task
        self.image_mean, self.image_std = base.image_mean, base.image_std

    def _images(self, arrays: list[np.ndarray]) -> torch.Tensor:
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return pixels.float().mul_(self.base.scale).add_(self.base.shift)

    def __call__(self, samples: Sequence[QaSample]) -> dict:
        ids, mask = self.base.token_ids([s.text for s in samples])
        out = {"images": self._images([s.image for s in samples]), "input_ids": ids, "attention_mask": mask,
               "keys": [s.key for s in samples]}
        if self.task == "nlvr2":
            out["images_2"] = self._images([s.image_2 for s in samples])
            out["labels"] = torch.tensor([s.label for s in samples], dtype=torch.long)  # (B,)
        elif all(s.scores is not None for s in samples):
            out["vqa_scores"] = torch.from_numpy(np.stack([s.scores for s in samples]))  # (B, answers)
            # (B, answers) numpy, not tensors: evaluation only (the model's forward never sees them)
            out["vqa_soft"] = np.stack([s.soft for s in samples])
            out["vqa_official"] = np.stack([s.official for s in samples])
        out["kinds"] = [s.kind for s in samples]
        return out
