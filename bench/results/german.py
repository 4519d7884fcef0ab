"""The digits in German: the language adapter's second language (docs/results.md, seed 001).

The same visible attributes as the English captions of bench/results/digits.py (digit, stroke
weight, slant, size), rendered in German by us, caption for caption, so that an English caption
and its German one are a translation pair. The digit names are feminine nouns (die Null, die
Eins, ..., die Neun), so articles and adjectives agree in the feminine: "Eine dicke
handgeschriebene Sieben, die nach rechts geneigt ist." (English: "A thick handwritten seven
leaning to the right.").

Written (called by digits.py; `python bench/results/digits.py OUT --german` for these alone):
  text_de/corpus.txt, text_de/val.txt      German captions of the train / val scans, one a line
  parallel/{train,val}_en_de.jsonl         {"src": English, "tgt": German}, the `--from parallel` records
  captions_de/dataset_digits.json          Karpathy JSON, German captions of the test scans
  shift_captions_de/{inverted,tinted}/     the same for the renditions (images: the English sets')
  classnames_de.txt                        German class names in the class folders' label order
  templates_de.txt                         the German counterparts of bench/results/templates.txt
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

NAMES_DE = ("Null", "Eins", "Zwei", "Drei", "Vier", "Fünf", "Sechs", "Sieben", "Acht", "Neun")
# Attributive after "eine" (feminine nominative), and after "mit" (dative plural: "mit dicken Strichen").
WEIGHT = {"thick": ("dicke", "dicken"), "thin": ("dünne", "dünnen")}
SIZE = {"tall": "große", "short": "kleine"}
SLANT = {"leaning to the right": "nach rechts geneigt", "leaning to the left": "nach links geneigt"}
# bench/results/templates.txt line by line ("a handwritten {}." ...); {} takes a name of NAMES_DE.
TEMPLATES_DE = ("Eine handgeschriebene {}.",
                "Eine aus einem Formular eingescannte {}.",
                "Die Ziffer {}.",
                "Eine handgeschriebene {}, die nach rechts geneigt ist.")


def captions_de(digit: int, a: dict[str, str]) -> list[str]:
    """The five German captions, in the order of digits.py's English ones (translation pairs)."""
    name, (weight, weight_pl), size, slant = NAMES_DE[digit], WEIGHT[a["weight"]], SIZE[a["size"]], SLANT[a["slant"]]
    return [f"Eine {weight} handgeschriebene {name}, die {slant} ist",
            f"Die Zahl {digit}, von Hand mit {weight_pl} Strichen geschrieben",
            f"Eine {size} {name}, aus einem Formular eingescannt",
            f"Eine {size} und {weight} Ziffer {name}",
            f"Eine handgeschriebene {name}, {slant}"]


def _karpathy(images: list[tuple[int, str, list[str]]]) -> str:
    """(imgid, split, German captions) -> Karpathy JSON; the PNGs are the English set's digit_<id>.png."""
    return json.dumps({"dataset": "digits_de", "images": [
        {"filename": f"digit_{i:04d}.png", "imgid": i, "split": split,
         "sentences": [{"raw": c + ".", "tokens": c.replace(",", "").split(), "imgid": i} for c in caps]}
        for i, split, caps in images]}, ensure_ascii=False)


def write(out: Path, labels: Sequence[int], attrs: Sequence[dict[str, str]], split: dict[int, str],
          names_en: Sequence[str], captions_en: Callable[[str, int, dict[str, str]], list[str]]) -> None:
    """The German files (module docstring) for scans with these labels, attributes and splits."""
    de = [captions_de(int(label), a) for label, a in zip(labels, attrs)]
    # The English side exactly as digits.py writes it into the Karpathy JSON (the CLIP teacher's text).
    en = [[c.capitalize() + "." for c in captions_en(names_en[label], int(label), a)] for label, a in zip(labels, attrs)]
    (out / "text_de").mkdir(parents=True, exist_ok=True)
    (out / "parallel").mkdir(parents=True, exist_ok=True)
    for part, text_file in (("train", "corpus.txt"), ("val", "val.txt")):
        ids = [i for i in range(len(labels)) if split[i] == part]
        (out / "text_de" / text_file).write_text("".join(c + ".\n" for i in ids for c in de[i]), encoding="utf-8")
        (out / "parallel" / f"{part}_en_de.jsonl").write_text(
            "".join(json.dumps({"src": s, "tgt": t + "."}, ensure_ascii=False) + "\n"
                    for i in ids for s, t in zip(en[i], de[i])), encoding="utf-8")
    test = [(i, "test", de[i]) for i in range(len(labels)) if split[i] == "test"]
    for root in ("captions_de", "shift_captions_de/inverted", "shift_captions_de/tinted"):
        (out / root).mkdir(parents=True, exist_ok=True)
        (out / root / "dataset_digits.json").write_text(_karpathy(test), encoding="utf-8")
    # The class folders are named by the English names; a folder cache's labels are their sorted
    # order (eight, five, ...), and a class-names file lists names in label order.
    by_label = sorted(range(len(names_en)), key=lambda d: names_en[d])
    (out / "classnames_de.txt").write_text("".join(NAMES_DE[d] + "\n" for d in by_label), encoding="utf-8")
    (out / "templates_de.txt").write_text("".join(t + "\n" for t in TEMPLATES_DE), encoding="utf-8")
