"""VQA v2 in its official files: questions JSON, annotations JSON and the COCO image folders.

    v2_OpenEnded_mscoco_train2014_questions.json   {"data_subtype": "train2014", "questions":
                                                    [{"image_id", "question", "question_id"}]}
    v2_mscoco_train2014_annotations.json            {"annotations": [{"question_id", "image_id",
                                                    "answers": [{"answer", "answer_confidence",
                                                    "answer_id"}] x 10, "multiple_choice_answer",
                                                    "answer_type", "question_type"}]}
    train2014/COCO_train2014_000000393225.jpg       the COCO images

SRC is a questions file (or a comma list of them, e.g. train2014 and val2014 together, as VLMo
trains for test-dev); the annotations file is found beside it by its official name. A test
split (``test-dev2015``, ``test2015``) has no annotations: it is cached for prediction, without
answers. ``--images ROOT``: the images are ``ROOT/<subtype>/COCO_<subtype>_<id:012d>.jpg`` or
``ROOT/COCO_...`` (default ROOT: the questions file's folder; test-dev's subtype is test2015).

The cache is image-only (each COCO image once; VQA has ~5 questions per image). The questions
and their answers go into ``questions.json`` beside the shards (``Source.tables``):
``{"answers": [vocabulary], "min_count": m, "questions": [{"question_id", "image": <image key>,
"question", "answer_type", "answers": {normalised answer: annotators}}]}``. The vocabulary is the
answers (normalised majority answers) given at least ``--min-count`` times (default 9, the
standard 3,129-answer list on train + val), most frequent first. A held-out cache's questions
are scored against the TRAINING cache's vocabulary (dodo/data/finetune.py), so train and eval
share it. A missing image is a bad sample (bad_samples.jsonl); its questions are left out when
the cache is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dodo.data.ingest import Item, Loaded, Source, SourceError, read_file, require_path
from dodo.data.ingest.vqa_answers import DEFAULT_MIN_COUNT, answer_counts, vocabulary

KIND = "vqa"
TABLE = "questions.json"
_NAME = re.compile(r"v2_OpenEnded_mscoco_(?P<sub>[a-z-]+\d{4})_questions\.json$")


def _load_json(path: Path, what: str, needs: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data[needs], data
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SourceError(f"{path} is not a {what} JSON ({err})") from None
    except (KeyError, TypeError):
        raise SourceError(f"{path} is not a {what} JSON: it needs a top-level '{needs}' list") from None


class VqaSource(Source):
    kind = KIND
    modality = "image"

    def __init__(self, src: str, **options: Any) -> None:
        super().__init__(src, **options)
        self.min_count = self.min_count or DEFAULT_MIN_COUNT  # --min-count (0: the standard 9)
        self.table: dict[str, Any] = {}
        self.annotated = False

    def _one_file(self, qpath: Path, items: dict[str, Item], questions: list, majority: list) -> str:
        qs, data = _load_json(qpath, "VQA questions", "questions")
        match = _NAME.search(qpath.name)
        sub = str(data.get("data_subtype") or (match.group("sub") if match else ""))
        if not sub:
            raise SourceError(f"{qpath}: no 'data_subtype' and not an official file name "
                              "(v2_OpenEnded_mscoco_<split><year>_questions.json); rename it so")
        test = sub.startswith("test")
        image_sub = "test" + sub[-4:] if test else sub  # test-dev2015's images are in test2015
        ann_path = qpath.with_name(f"v2_mscoco_{sub}_annotations.json")
        answers: dict[int, dict] | None = None
        if not test:
            if not ann_path.is_file():
                raise SourceError(f"{qpath} has no annotations beside it: expected {ann_path} (the official "
                                  f"v2_Annotations zip); only test questions are cached without answers")
            anns, _ = _load_json(ann_path, "VQA annotations", "annotations")
            answers = {a["question_id"]: a for a in anns if isinstance(a, dict) and "question_id" in a}
        root = require_path(self.images_dir, "--images folder", want_dir=True) if self.images_dir else qpath.parent
        folder = root / image_sub if (root / image_sub).is_dir() else root
        for n, q in enumerate(qs):
            if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
                raise SourceError(f"{qpath}: questions[{n}] lacks image_id / question / question_id; "
                                  "not a VQA v2 questions file")
            key = f"COCO_{image_sub}_{int(q['image_id']):012d}"
            where = f"{qpath}:question {q['question_id']}"
            text = " ".join(str(q["question"] or "").split())
            if not text:
                self.listing_bad.append((f"q{q['question_id']}", where, "empty question", ""))
                continue
            row: dict[str, Any] = {"question_id": q["question_id"], "image": key, "question": text}
            if answers is not None:
                a = answers.get(q["question_id"])
                given = [x.get("answer", "") for x in a.get("answers", []) if isinstance(x, dict)] if a else []
                if not given:
                    self.listing_bad.append((f"q{q['question_id']}", where, "missing annotation",
                                             f"no answers for it in {ann_path.name}"))
                    continue
                row["answers"] = answer_counts(given)
                row["answer_type"] = a.get("answer_type", "")
                majority.append(a.get("multiple_choice_answer") or max(row["answers"], key=row["answers"].get))
            questions.append(row)
            if key not in items:
                path = folder / f"{key}.jpg"
                items[key] = Item(key, str(path), str(path))
        return "test-dev" if sub.startswith("test-dev") else sub[:-4]

    def items(self) -> list[Item]:
        files = [require_path(s.strip(), "VQA questions file") for s in self.src.split(",") if s.strip()]
        if not files:
            raise SourceError("--from vqa needs a questions file (v2_OpenEnded_mscoco_<split>2014_questions.json)")
        items: dict[str, Item] = {}
        questions: list[dict] = []
        majority: list[str] = []
        splits = [self._one_file(f, items, questions, majority) for f in files]
        annotated = [("answers" in q) for q in questions]
        if any(annotated) and not all(annotated):
            raise SourceError(f"{self.src} mixes test questions (no answers) with annotated ones; cache them "
                              "separately")
        self.annotated = bool(questions) and all(annotated)
        vocab = vocabulary(majority, self.min_count) if self.annotated else []
        if self.annotated and not vocab:
            raise SourceError(f"no answer of {self.src} is given {self.min_count} times or more; lower "
                              "--min-count (the standard list uses 9 on train + val)")
        self.table = {"kind": KIND, "answers": vocab, "min_count": self.min_count if self.annotated else 0,
                      "questions": questions}
        self.dataset = self.dataset or "vqav2"
        self.split = self.split or ",".join(dict.fromkeys(splits))
        return [items[k] for k in sorted(items)]

    def load(self, item: Item) -> Loaded:
        return Loaded(read_file(Path(item.payload)), [])

    def tables(self) -> dict[str, Any]:
        return {TABLE: self.table}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "table": TABLE, "questions": len(self.table.get("questions", [])),
                "answers": len(self.table.get("answers", [])), "min_count": self.table.get("min_count", 0),
                "annotated": self.annotated}
