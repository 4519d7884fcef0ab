"""Evaluation config: retrieval / zero-shot / kNN / WiSE settings and the synthetic shift."""

from __future__ import annotations

from dataclasses import dataclass, field

from dodo.config.errors import check

# Each colour loses one shape and each shape two colours: a compositional shift, every word
# of an OOD caption is seen in training but never in that combination.
DEFAULT_HOLDOUT = ["red square", "green triangle", "blue circle", "yellow triangle", "purple circle",
                   "white square"]
# Zero-shot prompt templates for the shapes data: averaging over size and position leaves
# the class ("red circle").
DEFAULT_TEMPLATES = [f"a {size} {{}} in the {pos}" for size in ("small", "large")
                     for pos in ("top left", "top right", "bottom left", "bottom right", "center")]


@dataclass
class EvalConfig:
    # "colour shape" combinations held out of training (contrastive tasks): the OOD split
    # is the held-out split's images of these combinations; [] turns the shift off.
    ood_holdout: list[str] = field(default_factory=lambda: list(DEFAULT_HOLDOUT))
    num_ood: int = 256
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 1024  # training images in the kNN feature bank
    wise_alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])

    def __post_init__(self) -> None:
        from dodo.data.synthetic import COLOURS, SHAPES

        for i, combo in enumerate(self.ood_holdout):
            words = combo.split()
            check(len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES, "ood_holdout",
                  f"ood_holdout[{i}]={combo!r} must be 'colour shape' with colour in {list(COLOURS)} "
                  f"and shape in {list(SHAPES)}")
        check(len(set(self.ood_holdout)) < len(COLOURS) * len(SHAPES), "ood_holdout",
              "holds out every combination; leave some for training")
        check(self.num_ood > 0, "num_ood", f"must be > 0, got {self.num_ood}")
        check(all(k > 0 for k in self.retrieval_ks) and self.retrieval_ks, "retrieval_ks",
              f"must be positive integers, got {self.retrieval_ks}")
        check(all("{}" in t for t in self.templates) and self.templates, "templates",
              "every template needs a {} where the class name goes, e.g. 'a photo of a {}'")
        check(self.knn_k > 0, "knn_k", f"must be > 0, got {self.knn_k}")
        check(self.knn_temperature > 0, "knn_temperature", f"must be > 0, got {self.knn_temperature}")
        check(self.knn_bank > 0, "knn_bank", f"must be > 0, got {self.knn_bank}")
        check(all(0 <= a <= 1 for a in self.wise_alphas) and self.wise_alphas, "wise_alphas",
              f"must be numbers in [0, 1], got {self.wise_alphas}")
