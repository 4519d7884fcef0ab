"""Evaluation config: which suites a run measures, on which datasets (docs/methods.md).

    eval:
      suites:
        - kind: retrieval              # retrieval | zeroshot | knn | linear_probe | captioning | shapes
          datasets:
            - {name: coco_5k, cache: /data/coco_test, tag: id}
            - {name: flickr_1k, cache: /data/flickr_test, tag: ood}

Metrics are ``eval.<kind>.<dataset>.<metric>`` plus ``eval.<kind>.ood_mean.<metric>`` when a
suite has an OOD dataset. ``suites: []`` (the default) means "the data's default": the
``shapes`` suite for synthetic data, the family's own kinds on the held-out split otherwise
(``dodo.eval.suites.effective_suites``). What each kind needs from its caches is checked at
submit by ``dodo.eval.suites.check_suites``, reading manifests only.

This module stays torch-free: it runs at submit time. The shapes vocabulary lives in
dodo/eval/shapes/ and dodo/data/synthetic.py only; `check_suites` checks ood_holdout's words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from dodo.config.errors import check
from dodo.eval.shapes.config import DEFAULT_HOLDOUT, DEFAULT_TEMPLATES  # plain constants

KINDS = ("retrieval", "zeroshot", "knn", "linear_probe", "captioning", "shapes")
HELDOUT = "heldout"  # the name a dataset gets when `cache: ""` (the run's own held-out split)


@dataclass
class EvalDataset:
    name: str = HELDOUT  # label in metrics: eval.<kind>.<name>.<metric>
    cache: str = ""  # a dodo cache; "" = the run's held-out split (data.eval_cache or held out)
    tag: Literal["id", "ood"] = "id"  # OOD datasets are averaged into eval.<kind>.ood_mean.*
    train_cache: str = ""  # knn / linear_probe: the labelled training (bank) cache
    classnames: str = ""  # zeroshot: "" = the manifest's; "clip_benchmark:<dataset>" or a file
    templates: str = ""  # zeroshot: "" = "clip_benchmark:<dataset>" if known, else one template; or a file
    class_subset: str = ""  # "imagenet_r" / "imagenet_a" / "imagenet_o": score among the subset of 1000
    limit: int = 0  # 0 = every sample

    def __post_init__(self) -> None:
        check(bool(self.name) and all(c.isalnum() or c in "-_" for c in self.name) and self.name != "ood_mean",
              "name", f"must be a name of letters, digits, '-' or '_' (not 'ood_mean'), got {self.name!r}")
        check(self.limit >= 0, "limit", f"must be >= 0 (0 = all samples), got {self.limit}")


@dataclass
class EvalSuite:
    kind: Literal["retrieval", "zeroshot", "knn", "linear_probe", "captioning", "shapes"] = "retrieval"
    datasets: list[EvalDataset] = field(default_factory=lambda: [EvalDataset()])
    # Options, each read by the kinds named beside it (the others ignore it).
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # retrieval R@k; zeroshot top-k (1, 5)
    k: int = 20  # knn: neighbours
    temperature: float = 0.07  # knn: vote weight exp(sim / T)
    bank: int = 0  # knn / linear_probe: training samples used (0 = all)
    probe_c: float = 1.0  # linear_probe: inverse L2 strength of the logistic regression (sklearn's C)
    probe_max_iter: int = 1000  # linear_probe: L-BFGS iterations
    decoding: Literal["greedy", "beam", "sample"] = "greedy"  # captioning
    beams: int = 3  # captioning, decoding=beam
    top_k: int = 0  # captioning, decoding=sample (0 = off)
    top_p: float = 1.0  # captioning, decoding=sample (1 = off)
    sample_temperature: float = 1.0  # captioning, decoding=sample
    max_tokens: int = 0  # captioning: 0 = data.max_caption_tokens
    ood_holdout: Optional[list[str]] = None  # shapes: "colour shape" pairs held out; None = its default
    num_ood: int = 256  # shapes: OOD images

    def __post_init__(self) -> None:
        # Keys below name a scalar (datasets[j].name), which the loader can quote in its message.
        check(bool(self.datasets), "datasets[0]", "lists no dataset; add one, e.g. datasets: [{name: heldout}]")
        names = [d.name for d in self.datasets]
        for j, name in enumerate(names):
            check(name not in names[:j], f"datasets[{j}].name",
                  f"{name!r} is the name of an earlier dataset too; each dataset of a suite needs its own name")
        check(bool(self.ks) and all(k > 0 for k in self.ks), "ks", f"must be positive integers, got {self.ks}")
        for name in ("k", "beams", "probe_max_iter", "num_ood"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("bank", "top_k", "max_tokens"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.temperature > 0 and self.sample_temperature > 0 and self.probe_c > 0, "temperature",
              "temperature, sample_temperature and probe_c must be > 0")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.ood_holdout is not None:  # its words: checked by check_suites (the shapes suite)
            check(self.kind == "shapes", "ood_holdout", f"is an option of the shapes suite, not of {self.kind}")
            for i, pair in enumerate(self.ood_holdout):
                check(len(pair.split()) == 2, "ood_holdout", f"[{i}]={pair!r} must be 'colour shape', e.g. 'red square'")


@dataclass
class EvalConfig:
    suites: list[EvalSuite] = field(default_factory=list)  # [] = the data's default (see above)
    # Legacy keys, read by the contrastive tasks until they run the suites (then they go):
    # the implicit shapes suite (`suites: []` on synthetic data) takes ood_holdout / num_ood /
    # templates from here. Their defaults belong to the shapes suite (dodo/eval/shapes.py).
    ood_holdout: list[str] = field(default_factory=lambda: list(DEFAULT_HOLDOUT))  # [] = no shift
    num_ood: int = 256
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank: int = 1024  # training images in the kNN feature bank
    wise_alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    weightwatcher: bool = False  # summary.json: WeightWatcher's mean layer alpha (dodo/eval/weightwatch.py)

    def __post_init__(self) -> None:
        # The words are checked against the generator's vocabulary only when the shapes suite
        # runs (check_suites): a run on real data never imports the generator.
        for i, pair in enumerate(self.ood_holdout):
            check(len(pair.split()) == 2, "ood_holdout", f"[{i}]={pair!r} must be 'colour shape', e.g. 'red square'")
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
        if self.weightwatcher:  # found now, not after the training it would end
            import importlib.util
            check(importlib.util.find_spec("weightwatcher") is not None, "weightwatcher",
                  "is true, but the weightwatcher package is not installed; `pip install weightwatcher` "
                  "(setup.cfg lists it) or set eval.weightwatcher=false")
