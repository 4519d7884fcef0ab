"""The synthetic shapes suite's logic as the tasks use it, in one place: the only task code that
knows the shapes vocabulary. It applies only when the data is the embedded generator's
(samples carrying ``attrs`` colour / shape); callers check ``is_shapes`` first.

- classes: the 18 "colour shape" combinations, the zero-shot / kNN labels of shapes data;
- the colour-shape OOD shift (``eval.ood_holdout``): those combinations never appear in
  training; OOD metrics use held-out images of them, drawn from a separate generator stream;
- caption scoring: a generated caption is right when it names the image's colour and shape.

The vocabulary itself lives in the EVAL `shapes` suite (dodo/eval/shapes.py), which the lead
wires in to replace these task paths; the generator is imported only inside its functions, so
these paths import it only on shapes data.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import Dataset

from dodo.eval import shapes as suite


def is_shapes(samples: Sequence[Any]) -> bool:
    """True when every sample comes from the synthetic generator (its attributes are set)."""
    return bool(samples) and all({"colour", "shape"} <= set(getattr(s, "attrs", None) or {}) for s in samples)


def labels(samples: Sequence[Any]) -> list[int]:
    """Class index (into ``suite.classes()``) of each shapes sample."""
    names = suite.classes()
    return [names.index(suite.label_of(s)) for s in samples]


class Subset(Dataset):
    def __init__(self, base: Dataset, indices: list[int]):
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def ood_split(cfg: Any, train: Dataset, evals: Dataset) -> tuple[Dataset, Dataset, Dataset]:
    """(train, ID eval, OOD eval) under the colour-shape shift of ``cfg.eval.ood_holdout``.

    OOD images: held-out samples of the held-out combinations, from a separate generator
    stream (seed + 1) so they do not repeat the ID eval images."""
    holdout = set(cfg.eval.ood_holdout)
    pool = suite.ood_pool(cfg.eval.num_ood, sorted(holdout), cfg.data.image_size, cfg.data.seed)
    return (Subset(train, suite.split_by_holdout(train, holdout, keep_held=False)),
            Subset(evals, suite.split_by_holdout(evals, holdout, keep_held=False)),
            Subset(pool, suite.split_by_holdout(pool, holdout, keep_held=True, limit=cfg.eval.num_ood)))


def caption_report(samples: Sequence[Any], predicted: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """MAGMA's final report on shapes data: the share of captions naming colour and shape right."""
    right = [suite.caption_names_object(p, s.attrs) for s, p in zip(samples, predicted)]
    accuracy = sum(right) / max(1, len(right))
    lines = [f"greedy captions on held-out images ({sum(right)}/{len(right)} name the right colour and shape):"]
    lines += [f"  {'ok  ' if ok else 'MISS'} {s.key}: {p!r:40} (true: {s.caption!r})"
              for s, p, ok in list(zip(samples, predicted, right))[:8]]
    return {"eval.caption_accuracy": accuracy}, lines
