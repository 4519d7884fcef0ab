"""The `shapes` suite: the synthetic generator's own scoring. The only eval code that knows
the shapes vocabulary (colours, shapes, "a small red circle in the top left").

- classes are the 18 "colour shape" combinations, derived from each sample's ``attrs``;
- the OOD shift holds "colour shape" combinations out of training (``ood_holdout``): ID
  metrics use held-out images of the other combinations, OOD metrics images of the held-out
  ones (each word seen in training, never the combination);
- contrastive runs: retrieval (identical captions are positives of each other: the
  generator repeats captions) and zero-shot over the 18 classes, ID and OOD;
- captioning runs: the share of greedy captions naming the right colour and shape.

Torch-free at import; runners import torch lazily. The defaults the config layer needs are in
shapes/config.py (plain constants: the config layer imports nothing above it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from dodo.eval.shapes.config import DEFAULT_HOLDOUT, DEFAULT_TEMPLATES  # noqa: F401  (re-exported)


def classes() -> list[str]:
    """The 18 "colour shape" classes, in the generator's order."""
    from dodo.data.synthetic import COLOURS, SHAPES

    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def check_holdout(holdout: Sequence[str]) -> str | None:
    """None if ``holdout`` is a valid list of "colour shape" pairs, else the problem (one line)."""
    from dodo.data.synthetic import COLOURS, SHAPES

    for i, pair in enumerate(holdout):
        words = pair.split()
        if not (len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES):
            return (f"[{i}]={pair!r} must be 'colour shape' with colour in {list(COLOURS)} "
                    f"and shape in {list(SHAPES)}")
    if len(set(holdout)) >= len(COLOURS) * len(SHAPES):
        return "holds out every combination; leave some for training"
    return None


def ood_pool(num_ood: int, holdout: Sequence[str], image_size: int, seed: int) -> Any:
    """The OOD images' source: a fresh stream of the generator (seed + 1, so it does not repeat
    the held-out split), large enough to hold ``num_ood`` images of the held-out pairs."""
    from dodo.data.synthetic import SyntheticShapes

    return SyntheticShapes("eval", 2 * num_ood * 18 // max(1, len(holdout)), image_size, seed + 1)


def label_of(sample: Any) -> str:
    """A sample's "colour shape" class from the generator's attributes."""
    return f"{sample.attrs['colour']} {sample.attrs['shape']}"


def split_by_holdout(dataset: Any, holdout: set[str], keep_held: bool, limit: int = 0) -> list[int]:
    """Indices of the samples whose class is (keep_held) or is not in ``holdout``."""
    out = []
    for i in range(len(dataset)):
        if (label_of(dataset[i]) in holdout) == keep_held:
            out.append(i)
            if limit and len(out) == limit:
                break
    return out


def caption_names_object(predicted: str, attrs: dict[str, str]) -> bool:
    """Whether a generated caption names the sample's colour and shape."""
    from dodo.data.synthetic import caption_attributes

    got = caption_attributes(predicted)
    return got.get("colour") == attrs["colour"] and got.get("shape") == attrs["shape"]


def shapes_contrastive(encode_images: Callable, encode_texts: Callable, samples: Sequence[Any],
                       ks: Sequence[int] = (1, 5, 10), templates: Sequence[str] = DEFAULT_TEMPLATES,
                       batch_size: int = 128) -> dict[str, float]:
    """Retrieval (identical captions are positives) and zero-shot over the 18 classes."""
    import torch

    from dodo.eval.retrieval import embed_images, embed_texts, positives_from_captions, recall_at_k
    from dodo.eval.zeroshot import class_embeddings, zero_shot_accuracy

    img = embed_images(encode_images, [s.image for s in samples], batch_size)  # (N, D)
    caps = [s.caption for s in samples]
    texts = sorted(set(caps))  # unique captions as the text gallery
    txt = embed_texts(encode_texts, texts, batch_size)  # (T, D)
    out = recall_at_k(img @ txt.T, positives_from_captions(caps, texts), ks)
    names = classes()
    cls = class_embeddings(encode_texts, names, templates)
    labels = torch.tensor([names.index(label_of(s)) for s in samples])
    out.update({f"zeroshot_{k}": v for k, v in zero_shot_accuracy(img, cls, labels, (1, 5)).items()})
    return out


def shapes_captioning(generate: Callable[[list], list[str]], samples: Sequence[Any],
                      batch_size: int = 32) -> dict[str, float]:
    """The share of generated captions naming the right colour and shape."""
    right = 0
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo:lo + batch_size]
        for s, text in zip(chunk, generate([s.image for s in chunk])):
            right += caption_names_object(text, s.attrs)
    return {"caption_accuracy": right / max(1, len(samples))}
