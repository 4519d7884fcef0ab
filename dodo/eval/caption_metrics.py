"""Captioning metrics against all references: BLEU-4 and CIDEr-D with pycocoevalcap's scorers.

pycocoevalcap's ``Cider`` is the CIDEr-D of the COCO caption server (Gaussian length penalty
sigma = 6, clipped n-gram counts), its ``Bleu(4)`` the "closest reference length" BLEU. The
server tokenises with the Stanford PTB tokenizer, which runs Java; we tokenise in Python
instead (``tokenize``: lower case, split off punctuation, drop the punctuation tokens the PTB
step drops), so scores can differ from the server's by tokenisation only, and nothing here
needs Java. Note CIDEr-D's document frequencies come from the references given: score a
whole test set in one call, as the papers do, not batch by batch.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

# The tokens pycocoevalcap's PTBTokenizer removes after tokenising.
PUNCTUATION = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
               "...", ";"}
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]+")


def tokenize(text: str) -> str:
    """Lower-cased words separated by single spaces, punctuation dropped:
    "A man, riding a bike." -> "a man riding a bike"."""
    tokens = _TOKEN.findall(text.lower())
    return " ".join(t for t in tokens if t not in PUNCTUATION and not set(t) <= set(".,!?;:-'`\"()"))


def score_captions(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """references: image key -> its reference captions (all of them); predictions: image key ->
    one generated caption. Returns {"bleu4": ..., "cider": ...} (CIDEr-D, x1 not x100)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(predictions):
        missing = sorted(set(references) ^ set(predictions))[:3]
        raise ValueError(f"references and predictions cover different images, e.g. {missing}")
    if not predictions:
        raise ValueError("no captions to score")
    gts = {k: [tokenize(r) for r in refs] for k, refs in references.items()}
    res = {k: [tokenize(p)] for k, p in predictions.items()}
    empty = [k for k, refs in gts.items() if not refs]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference caption")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def references_by_image(dataset, limit: int = 0) -> tuple[list, list[str], dict[str, list[str]]]:
    """(images, image keys, key -> every caption of that image) from a dataset of Samples,
    each image once (by image_id); ``limit`` caps the images."""
    images, keys, refs = [], [], {}
    row: dict[int, str] = {}
    for i in range(len(dataset)):
        s = dataset[i]
        iid = s.image_id if s.image_id >= 0 else -(i + 1)
        if iid not in row:
            if limit and len(images) == limit:
                continue
            row[iid] = str(s.image_id if s.image_id >= 0 else s.key)
            images.append(s.image)
            keys.append(row[iid])
            refs[row[iid]] = []
        if s.caption:
            refs[row[iid]].append(s.caption)
    return images, keys, refs


def run_captioning(generate, dataset, limit: int = 0, batch_size: int = 32) -> dict[str, float]:
    """The captioning suite on one dataset: ``generate(list of (H, W, 3) uint8 images) -> list[str]``."""
    images, keys, refs = references_by_image(dataset, limit)
    keep = [i for i, k in enumerate(keys) if refs[k]]  # images without captions have no reference
    preds = {}
    for lo in range(0, len(keep), batch_size):
        chunk = keep[lo:lo + batch_size]
        for i, text in zip(chunk, generate([images[i] for i in chunk])):
            preds[keys[i]] = text
    return score_captions({keys[i]: refs[keys[i]] for i in keep}, preds)
