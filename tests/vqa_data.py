"""VQA v2 and NLVR2 written in their official formats (json / JSON lines, PIL images), with
natural-language questions, 10 annotator answers each, and statements about image pairs.

Each picture shows ``count`` objects (bus / dog / cat, drawn as coloured shapes) of one colour;
the questions and statements are true of it, so the answers are what annotators would give.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (205, 35, 30), "blue": (35, 70, 205), "green": (40, 160, 60), "yellow": (230, 205, 40)}
OBJECTS = ("bus", "dog", "cat")
WORDS = ("zero", "one", "two", "three", "four")


def plural(obj: str) -> str:
    return obj + ("es" if obj == "bus" else "s")


def scene(i: int) -> tuple[str, str, int]:
    """(colour, object, count) of picture i, drawn at random (seeded by i: no period a text or an
    index could give away)."""
    rng = random.Random(1_000_003 * i + 17)
    return rng.choice(list(COLORS)), rng.choice(OBJECTS), rng.randint(1, 3)


def picture(i: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    color, obj, count = scene(i)
    rng = random.Random(i)  # each picture its own layout, background and shade: no two alike
    im = Image.new("RGB", size, tuple(rng.randint(200, 250) for _ in range(3)))
    draw = ImageDraw.Draw(im)
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLORS[color])
    top, w = rng.randint(4, 14), rng.randint(9, 12)
    for k in range(count):
        x, y = 2 + k * 15 + rng.randint(0, 2), top + rng.randint(-3, 3)
        if obj == "bus":
            draw.rectangle([x, y, x + w, y + w - 3], fill=fill)
        elif obj == "dog":
            draw.ellipse([x, y, x + w, y + w], fill=fill)
        else:
            draw.polygon([(x, y + w + 2), (x + w // 2, y), (x + w, y + w + 2)], fill=fill)
    return im


def vqa_questions(i: int, qid: int) -> list[dict]:
    """Three questions about picture i, each with 10 annotators' answers (several spellings)."""
    color, obj, count = scene(i)
    other = OBJECTS[(OBJECTS.index(obj) + 1) % 3]
    ten = lambda answers: [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}  # noqa: E731
                           for j, a in enumerate(answers)]
    return [
        {"question_id": qid, "question": f"What color is the {obj}?", "question_type": "what color is the",
         "answer_type": "other", "multiple_choice_answer": color,
         "answers": ten([color] * 7 + [f"{color.capitalize()}."] * 2 + [f"dark {color}"])},
        {"question_id": qid + 1, "question": f"How many {plural(obj)} are in the picture?", "question_type": "how many",
         "answer_type": "number", "multiple_choice_answer": WORDS[count],
         "answers": ten([WORDS[count]] * 5 + [str(count)] * 4 + [str(count + 1)])},
        # even pictures: asked about what they show ("yes"), odd ones: about another object ("no")
        {"question_id": qid + 2, "question": f"Is there a {obj if i % 2 == 0 else other} in the image?",
         "question_type": "is there a", "answer_type": "yes/no", "multiple_choice_answer": "no" if i % 2 else "yes",
         "answers": ten(["No"] * 6 + ["no"] * 2 + ["yes"] * 2 if i % 2 else ["yes"] * 8 + ["Yes"] + ["no"])},
    ]


def write_vqa(root: Path, sub: str, ids: list[int], annotations: bool = True, missing: tuple[int, ...] = ()
              ) -> Path:
    """``v2_OpenEnded_mscoco_<sub>_questions.json`` (+ annotations) and ``<image sub>/COCO_*.jpg``
    under root; picture i has COCO image id 1000 + i. Returns the questions file."""
    image_sub = "test" + sub[-4:] if sub.startswith("test") else sub
    (root / image_sub).mkdir(parents=True, exist_ok=True)
    questions, anns = [], []
    for i in ids:
        image_id = 1000 + i
        if i not in missing:
            picture(i).save(root / image_sub / f"COCO_{image_sub}_{image_id:012d}.jpg", quality=92)
        for q in vqa_questions(i, 10 * image_id):
            questions.append({"image_id": image_id, "question": q["question"], "question_id": q["question_id"]})
            anns.append({"question_id": q["question_id"], "image_id": image_id, "answers": q["answers"],
                         "multiple_choice_answer": q["multiple_choice_answer"], "answer_type": q["answer_type"],
                         "question_type": q["question_type"]})
    info = {"description": "This is v2.0 of the VQA dataset.", "version": "2.0"}
    qfile = root / f"v2_OpenEnded_mscoco_{sub}_questions.json"
    qfile.write_text(json.dumps({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
                                 "data_subtype": sub, "questions": questions, "license": {}}))
    if annotations:
        (root / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps(
            {"info": info, "data_type": "mscoco", "data_subtype": sub, "annotations": anns, "license": {}}))
    return qfile


def nlvr2_statements(left: int, right: int) -> list[tuple[str, bool]]:
    """Statements about the picture pair (left, right) and whether each is true."""
    lc, lo, ln = scene(left)
    rc, ro, rn = scene(right)
    rng = random.Random(7919 * left + right)  # true or false at random, half each
    n = ln if rng.random() < 0.5 else (ln % 3) + 1
    c = rc if rng.random() < 0.5 else list(COLORS)[(list(COLORS).index(rc) + rng.randint(1, 3)) % 4]
    return [(f"The left image contains exactly {WORDS[n]} {plural(lo)}.", n == ln),
            (f"There is a {c} {ro} in the right image.", c == rc),
            (f"Both images contain {plural(lo)}.", lo == ro)]


def write_nlvr2(root: Path, split: str, n_pairs: int, offset: int = 0, missing: tuple[str, ...] = ()) -> Path:
    """``root/data/<split>.json`` (JSON lines) and ``root/images/<split>/[<set % 100>/]*.png``
    (train in numbered subfolders, dev / test1 flat, as the official release). Returns the file."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = []
    for p in range(n_pairs):
        left, right = offset + 2 * p, offset + 2 * p + 1
        set_id = 100 + p
        folder = root / "images" / split / (str(set_id % 100) if split == "train" else "")
        folder.mkdir(parents=True, exist_ok=True)
        for side, i in (("img0", left), ("img1", right)):
            name = f"{split}-{set_id}-0-{side}"
            if name not in missing:
                picture(i).save(folder / f"{name}.png")
        for s, (sentence, truth) in enumerate(nlvr2_statements(left, right)):
            lines.append(json.dumps({"validation": {}, "sentence": sentence, "left_url": f"http://x/{left}.jpg",
                                     "writer": "w", "label": "True" if truth else "False",
                                     "right_url": f"http://x/{right}.jpg", "synset": "n02084071",
                                     "query": "dogs", "identifier": f"{split}-{set_id}-0-{s}",
                                     "extra_validations": {}}))
    path = root / "data" / f"{split}.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def all_texts() -> list[str]:
    """Every question and statement the writers make (for a word-level test tokenizer)."""
    texts = [q["question"] for i in range(24) for q in vqa_questions(i, 0)]
    return texts + [s for i in range(24) for s, _ in nlvr2_statements(i, i + 1)]
