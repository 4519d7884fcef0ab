"""A small real dataset for docs/results.md: scikit-learn's handwritten digits, in real formats.

scikit-learn ships the UCI "optical recognition of handwritten digits" set (1,797 scans of
digits written by 43 people, 8x8, 17 grey levels) with the package, so it is real data that
this machine can use without a download. This script writes it the way researchers receive
datasets, so every run goes through `dodo data cache` like COCO or ImageNet would:

- `captions/dataset_digits.json` + `captions/images/*.png`: Karpathy-split JSON (train /
  val / test), 5 natural-language captions per image. The captions describe what is visible in
  that scan (the digit, its stroke weight, slant and size), so retrieval has a signal beyond the
  class: "a thick handwritten seven leaning to the right".
- `pretrain_captions/`: the training scans in all three renditions (the stand-in for web-scale
  pretraining data; fine-tuning then sees the plain rendition only).
- `folders/{train,test}/<name>/*.png`: class folders (ImageNet layout; the folder names are the
  class names).
- `shift/{inverted,tinted}/<name>/*.png` and `shift_captions/`: the test scans rendered
  differently (white ink on black; coloured ink on a coloured, noisy background): the
  out-of-distribution sets, as ImageNet-R / -Sketch are renditions of ImageNet's classes.
- German (the language adapter's second language; bench/results/german.py): `text_de/`
  (corpus.txt: the train scans' German captions; val.txt: the val scans'), `parallel/`
  ({train,val}_en_de.jsonl: {"src": English, "tgt": German}, caption by caption), German
  Karpathy JSON for the test scans (`captions_de/`, `shift_captions_de/{inverted,tinted}/`,
  the images are the English sets'), `classnames_de.txt` (label order) and `templates_de.txt`.

    python bench/results/digits.py OUT            # then bench/results/caches.sh OUT
    python bench/results/digits.py OUT --german   # the German parts only (OUT already written)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 32  # written at 32 px (bicubic from 8x8): the size the tiny towers take


def _attributes(scan: np.ndarray, label: int, medians: dict[str, np.ndarray]) -> dict[str, str]:
    """Visible properties of one 8x8 scan (ink 0..16), each split at its class median."""
    ink = scan.sum()
    rows = np.nonzero(scan.sum(1) > 4)[0]
    height = (rows[-1] - rows[0] + 1) if len(rows) else 0
    ys, xs = np.nonzero(scan > 4)
    slant = float(np.cov(xs, -ys)[0, 1]) if len(xs) > 2 else 0.0  # > 0: top leans right
    return {"weight": "thick" if ink > medians["ink"][label] else "thin",
            "size": "tall" if height > medians["height"][label] else "short",
            "slant": "leaning to the right" if slant > medians["slant"][label] else "leaning to the left"}


def _captions(name: str, digit: int, a: dict[str, str]) -> list[str]:
    return [f"a {a['weight']} handwritten {name} {a['slant']}",
            f"the number {digit} written by hand with {a['weight']} strokes",
            f"a {a['size']} {name} scanned from a form",
            f"a {a['size']} and {a['weight']} digit {name}",
            f"a handwritten {name} {a['slant']}"]


def _render(scan: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    grey = (scan / 16.0)[:, :, None]  # (8, 8, 1) ink amount
    if style == "plain":  # dark ink on white paper
        pixels = 255 * (1 - grey) * np.ones(3)
    elif style == "inverted":  # white chalk on a blackboard
        pixels = 255 * grey * np.ones(3)
    elif style == "tinted":  # coloured ink on coloured, noisy paper
        paper, ink = rng.integers(120, 255, 3), rng.integers(0, 120, 3)
        pixels = paper * (1 - grey) + ink * grey + rng.normal(0, 18, (8, 8, 3))
    else:
        raise ValueError(style)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img.resize((SIZE, SIZE), Image.BICUBIC)


def scans_and_splits(n_test: int = 400, n_val: int = 100) -> tuple[np.ndarray, np.ndarray, dict[int, str],
                                                                     dict[str, np.ndarray]]:
    """(scans (N, 8, 8), labels (N,), scan index -> split, per-class attribute medians)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans, labels = digits.images, digits.target
    order = np.random.default_rng(0).permutation(len(scans))  # fixed split, stratified enough
    split = {int(i): ("test" if k < n_test else "val" if k < n_test + n_val else "train")
             for k, i in enumerate(order)}
    stats = {"ink": [], "height": [], "slant": []}
    for s in scans:
        rows = np.nonzero(s.sum(1) > 4)[0]
        yy, xx = np.nonzero(s > 4)
        stats["ink"].append(s.sum())
        stats["height"].append(rows[-1] - rows[0] + 1 if len(rows) else 0)
        stats["slant"].append(float(np.cov(xx, -yy)[0, 1]) if len(xx) > 2 else 0.0)
    medians = {k: np.array([np.median(np.asarray(v)[labels == c]) for c in range(10)]) for k, v in stats.items()}
    return scans, labels, split, medians


def write(out: Path, n_test: int = 400, n_val: int = 100) -> None:
    scans, labels, split, medians = scans_and_splits(n_test, n_val)

    rng = np.random.default_rng(1)
    for style, root in (("plain", "captions"), ("inverted", "shift_captions/inverted"),
                        ("tinted", "shift_captions/tinted")):
        images: list[dict] = []
        (out / root / "images").mkdir(parents=True, exist_ok=True)
        for i, (scan, label) in enumerate(zip(scans, labels)):
            if style != "plain" and split[i] != "test":
                continue
            name = f"digit_{i:04d}.png"
            _render(scan, style, rng).save(out / root / "images" / name)
            caps = _captions(NAMES[label], int(label), _attributes(scan, int(label), medians))
            images.append({"filename": name, "imgid": i, "split": split[i],
                           "sentences": [{"raw": c.capitalize() + ".", "tokens": c.split(), "imgid": i}
                                         for c in caps]})
        (out / root / "dataset_digits.json").write_text(json.dumps({"images": images, "dataset": "digits"}))

    # The "pretraining" set: the training scans in all three renditions, captioned alike (as a
    # web-scale model has seen many renditions), for the stage that stands in for a pretrained
    # CLIP in docs/results.md; fine-tuning then sees the plain rendition only.
    images = []
    (out / "pretrain_captions" / "images").mkdir(parents=True, exist_ok=True)
    for k, style in enumerate(("plain", "inverted", "tinted")):
        for i, (scan, label) in enumerate(zip(scans, labels)):
            if split[i] == "test":
                continue
            name = f"{style}_{i:04d}.png"
            _render(scan, style, rng).save(out / "pretrain_captions" / "images" / name)
            caps = _captions(NAMES[label], int(label), _attributes(scan, int(label), medians))
            images.append({"filename": name, "imgid": k * len(scans) + i, "split": split[i],
                           "sentences": [{"raw": c.capitalize() + ".", "tokens": c.split()} for c in caps]})
    (out / "pretrain_captions" / "dataset_digits.json").write_text(json.dumps({"images": images, "dataset": "digits"}))

    for style, root in (("plain", "folders"), ("inverted", "shift/inverted"), ("tinted", "shift/tinted")):
        for i, (scan, label) in enumerate(zip(scans, labels)):
            part = "train" if split[i] != "test" else "test"
            if style != "plain" and part != "test":
                continue
            folder = out / root / part / NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            _render(scan, style, rng).save(folder / f"digit_{i:04d}.png")

    corpus = [c.capitalize() + "." for img in json.loads((out / "captions" / "dataset_digits.json").read_text())["images"]
              if img["split"] == "train" for c in (s["raw"][:-1].lower() for s in img["sentences"])]
    (out / "text").mkdir(exist_ok=True)
    (out / "text" / "corpus.txt").write_text("\n".join(corpus) + "\n")
    write_german(out, n_test, n_val)


def write_german(out: Path, n_test: int = 400, n_val: int = 100) -> None:
    """The German parts (module docstring); draws no random numbers, so the other outputs stay as they were."""
    from german import write as german  # bench/results/german.py, beside this file

    scans, labels, split, medians = scans_and_splits(n_test, n_val)
    attrs = [_attributes(scan, int(label), medians) for scan, label in zip(scans, labels)]
    german(out, [int(x) for x in labels], attrs, split, NAMES, _captions)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--german"]
    if len(args) != 1:
        sys.exit("usage: python bench/results/digits.py OUT_FOLDER [--german]")
    (write_german if "--german" in sys.argv else write)(Path(args[0]))
