"""The synthetic shapes suite's logic, in one place: the only task code that knows the shapes
vocabulary. Everything here applies only when the data is the embedded synthetic generator's
(samples carrying ``attrs`` colour / shape); callers check ``is_shapes`` first.

- classes: the 18 "colour shape" combinations, the zero-shot / kNN labels of shapes data;
- the colour-shape OOD shift (``eval.ood_holdout``): those combinations never appear in
  training; OOD metrics use held-out images of them, drawn from a separate generator stream;
- caption scoring: a generated caption is right when it names the image's colour and shape.

The EVAL helper's ``shapes`` suite (dodo/eval/suites.py) is to take this over; the generator
is imported inside the functions, so a run on other data never imports it.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset


def is_shapes(samples: Sequence[Any]) -> bool:
    """True when every sample comes from the synthetic generator (its attributes are set)."""
    return bool(samples) and all({"colour", "shape"} <= set(getattr(s, "attrs", None) or {}) for s in samples)


def classes() -> list[str]:
    from dodo.data.synthetic import COLOURS, SHAPES

    return [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 18 "colour shape" classes


def combo(caption: str) -> str:
    """The "colour shape" class a caption names (its first colour and shape words)."""
    from dodo.data.synthetic import caption_attributes

    a = caption_attributes(caption)
    return f"{a['colour']} {a['shape']}"


def labels(captions: Sequence[str]) -> list[int]:
    """Class index of each shapes caption (see ``classes``)."""
    names = classes()
    return [names.index(combo(c)) for c in captions]


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def split_by_combo(ds: Dataset, holdout: set[str], keep_held: bool, limit: int | None = None) -> Subset:
    """The samples whose "colour shape" is (keep_held) or is not in ``holdout``."""
    out = []
    for i in range(len(ds)):
        if (combo(ds[i].caption) in holdout) == keep_held:
            out.append(i)
            if limit is not None and len(out) == limit:
                break
    return Subset(ds, out)


def ood_split(cfg: Any, train: Dataset, evals: Dataset) -> tuple[Dataset, Dataset, Dataset]:
    """(train, ID eval, OOD eval) under the colour-shape shift of ``cfg.eval.ood_holdout``.

    OOD images: held-out samples of the held-out combinations, from a separate generator
    stream (seed + 1) so they do not repeat the ID eval images."""
    from dodo.data.synthetic import SyntheticShapes

    holdout = set(cfg.eval.ood_holdout)
    n_classes = len(classes())
    pool = SyntheticShapes("eval", 2 * cfg.eval.num_ood * n_classes // max(1, len(holdout)),
                           cfg.data.image_size, cfg.data.seed + 1)
    return (split_by_combo(train, holdout, keep_held=False), split_by_combo(evals, holdout, keep_held=False),
            split_by_combo(pool, holdout, keep_held=True, limit=cfg.eval.num_ood))


def caption_report(samples: Sequence[Any], predicted: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """MAGMA's final report on shapes data: the share of captions naming colour and shape right."""
    from dodo.data.synthetic import caption_attributes

    right = []
    for s, p in zip(samples, predicted):
        got = caption_attributes(p)
        right.append(got["colour"] == s.attrs["colour"] and got["shape"] == s.attrs["shape"])
    accuracy = sum(right) / max(1, len(right))
    lines = [f"greedy captions on held-out images ({sum(right)}/{len(right)} name the right colour and shape):"]
    lines += [f"  {'ok  ' if ok else 'MISS'} {s.key}: {p!r:40} (true: {s.caption!r})"
              for s, p, ok in list(zip(samples, predicted, right))[:8]]
    return {"eval.caption_accuracy": accuracy}, lines
