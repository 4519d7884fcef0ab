"""The evaluation suite kinds, what each needs from its data, and the submit-time check.

``check_suites(cfg)`` reads cache manifests only (no shard, no torch) and raises one
ConfigError line naming the suite, the dataset, what is missing and the fix, so that
``dodo submit`` refuses, before anything is written, a suite its data cannot feed.
Running the suites is dodo/eval/runner.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dodo.config.errors import ConfigError
from dodo.eval.config import HELDOUT, EvalDataset, EvalSuite


@dataclass(frozen=True)
class SuiteKind:
    name: str
    needs_images: bool = True
    needs_captions: bool = False  # captions with image ids (retrieval, captioning references)
    needs_labels: bool = False  # Sample.label on the test data
    needs_classnames: bool = False  # names to build class text embeddings from
    needs_train_cache: bool = False  # a labelled training (bank) cache
    needs_synthetic: bool = False  # the generator's attributes (shapes)
    hooks: tuple[str, ...] = ()  # the family callables it uses (dodo/eval/runner.py SuiteHooks)
    why: str = ""  # what it measures, for messages


KINDS: dict[str, SuiteKind] = {k.name: k for k in (
    SuiteKind("retrieval", needs_captions=True, hooks=("encode_images", "encode_texts"),
              why="image<->text recall"),
    SuiteKind("zeroshot", needs_labels=True, needs_classnames=True, hooks=("encode_images", "encode_texts"),
              why="zero-shot classification"),
    SuiteKind("knn", needs_labels=True, needs_train_cache=True, hooks=("encode_images",), why="kNN classification"),
    SuiteKind("linear_probe", needs_labels=True, needs_train_cache=True, hooks=("encode_images",),
              why="a linear probe"),
    SuiteKind("captioning", needs_captions=True, hooks=("generate",), why="captioning (BLEU-4 / CIDEr-D)"),
    SuiteKind("shapes", needs_synthetic=True, why="the synthetic shapes scoring"),
)}

# What `dodo data cache` builds each kind of data from, for the fixes in messages.
_FIX = {
    "labels": "a labelled cache (dodo data cache SRC --from folder|cifar ..., see docs/data.md)",
    "captions": "a cache of captioned images (dodo data cache SRC --from coco|karpathy|webdataset ...)",
    "images": "a cache with images",
    "synthetic": "the synthetic shapes data (data.kind=synthetic or a cache built --from synthetic)",
}


@dataclass
class CacheFacts:
    """What a cache (or the run's own data) can feed, read from its manifest."""
    where: str  # for messages: the cache path, or "data.train_cache=..." etc.
    modality: str = "image_text"
    captions_per_image: float = 1.0
    has_labels: bool = False
    classnames: tuple[str, ...] = ()
    class_ids: tuple[str, ...] = ()
    dataset: str = ""
    synthetic: bool = False


def read_facts(path: str) -> CacheFacts:
    """A cache's facts from its manifest.json (torch-free). Older manifests lack the fields the
    DATA layer added later; they read with defaults (a synthetic source still counts)."""
    from dodo.data.manifest import CacheError, Manifest

    try:
        m = Manifest.load(Path(path).expanduser())
    except CacheError as err:
        raise ConfigError(str(err)) from None
    source = getattr(m, "source", {}) or {}
    synthetic = bool(getattr(m, "synthetic", False)) or source.get("kind") == "synthetic"
    return CacheFacts(where=str(path), modality=getattr(m, "modality", "image_text"),
                      captions_per_image=float(getattr(m, "captions_per_image", 0.0) or
                                               (m.num_captions / m.num_samples if m.num_samples else 0.0)),
                      has_labels=bool(getattr(m, "has_labels", False)),
                      classnames=tuple(getattr(m, "classnames", []) or ()),
                      class_ids=tuple(getattr(m, "class_ids", []) or ()),
                      dataset=getattr(m, "dataset", "") or ("synthetic" if synthetic else ""), synthetic=synthetic)


def run_data_facts(data: Any, split: str) -> CacheFacts:
    """Facts of the run's own data (``split``: "train" or "eval"): the generator for
    data.kind=synthetic or a cache still to be built from it, else the cache's manifest."""
    if data.kind == "synthetic":
        return CacheFacts(where="data.kind=synthetic", synthetic=True, dataset="synthetic")
    key = "eval_cache" if split == "eval" and data.eval_cache else "train_cache"
    path = getattr(data, key)
    if not (Path(path).expanduser() / "manifest.json").exists() and data.synthetic_on_first_use:
        return CacheFacts(where=f"data.{key}={path}", synthetic=True, dataset="synthetic")
    facts = read_facts(path)
    facts.where = f"data.{key}={path}"
    return facts


def effective_suites(cfg: Any, default_kinds: Sequence[str] = ()) -> list[EvalSuite]:
    """``eval.suites``, or when it is empty the data's default: ``shapes`` on synthetic data,
    else one suite per kind of ``default_kinds`` (the family's) on the held-out split."""
    if cfg.eval.suites:
        return list(cfg.eval.suites)
    data = cfg.data
    synthetic = data.kind == "synthetic" or data.synthetic_on_first_use and not (
        Path(data.train_cache).expanduser() / "manifest.json").exists()
    if not synthetic:
        try:
            synthetic = run_data_facts(data, "eval").synthetic
        except ConfigError:
            synthetic = False
    if synthetic:
        return [EvalSuite(kind="shapes", ood_holdout=list(cfg.eval.ood_holdout), num_ood=cfg.eval.num_ood)]
    return [EvalSuite(kind=k) for k in default_kinds]


def _refuse(i: int, suite: EvalSuite, ds: EvalDataset, where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"eval.suites[{i}] {suite.kind} on dataset {ds.name!r} ({where}): {problem}; {fix}")


def check_suites(cfg: Any, default_kinds: Sequence[str] = (), hooks: Sequence[str] | None = None) -> None:
    """Raise ConfigError (one line) for the first suite its data cannot feed.

    ``hooks``: the family's eval callables ("encode_images", "encode_texts", "generate"), when
    known, so a captioning suite on a contrastive family is refused too."""
    from dodo.eval import classnames as cn

    for i, suite in enumerate(effective_suites(cfg, default_kinds)):
        kind = KINDS[suite.kind]
        if suite.kind == "shapes" and suite.ood_holdout:  # the generator's words (torch-free)
            from dodo.eval.shapes import check_holdout

            problem = check_holdout(suite.ood_holdout)
            if problem:
                where = f"eval.suites[{i}].ood_holdout" if cfg.eval.suites else "eval.ood_holdout"
                raise ConfigError(f"{where}{problem}")
        if hooks is not None:
            lacking = [h for h in kind.hooks if h not in hooks]
            if lacking:
                raise ConfigError(f"eval.suites[{i}] {suite.kind}: model.family={cfg.model.family} has no "
                                  f"{' / '.join(lacking)} for {kind.why}; remove the suite")
        for ds in suite.datasets:
            facts = read_facts(ds.cache) if ds.cache else run_data_facts(cfg.data, "eval")
            if ds.cache == "" and ds.name != HELDOUT:
                facts.where = f"{facts.where}, the run's held-out split"
            remove = "or remove the suite"
            if kind.needs_synthetic and not facts.synthetic:
                raise _refuse(i, suite, ds, facts.where, "the data is not the synthetic shapes data",
                              f"the shapes suite scores the generator's colours and shapes only; use "
                              f"retrieval / zeroshot / knn / captioning suites on real data {remove}")
            if kind.needs_images and facts.modality == "text":
                raise _refuse(i, suite, ds, facts.where, "the cache holds text only",
                              f"{kind.why} needs {_FIX['images']} {remove}")
            if kind.needs_captions and (facts.modality == "image" or facts.captions_per_image <= 0):
                raise _refuse(i, suite, ds, facts.where, "the cache has no captions",
                              f"{kind.why} needs {_FIX['captions']} {remove}")
            if kind.needs_labels and not facts.has_labels and not facts.synthetic:
                raise _refuse(i, suite, ds, facts.where, "the cache has no labels",
                              f"{kind.why} needs {_FIX['labels']} {remove}")
            if kind.needs_labels and facts.synthetic and suite.kind != "shapes":
                raise _refuse(i, suite, ds, facts.where, "the synthetic shapes data has no labels",
                              "its classes are scored by the shapes suite: use kind: shapes")
            if kind.needs_train_cache:
                _check_train_cache(i, suite, ds, cfg.data)
            if kind.needs_classnames:
                _check_classes(i, suite, ds, facts, cn)


def _check_train_cache(i: int, suite: EvalSuite, ds: EvalDataset, data: Any) -> None:
    train = read_facts(ds.train_cache) if ds.train_cache else run_data_facts(data, "train")
    if not train.has_labels:
        raise _refuse(i, suite, ds, train.where, "its training (bank) cache has no labels",
                      f"set train_cache to {_FIX['labels']}, or remove the suite")


def _check_classes(i: int, suite: EvalSuite, ds: EvalDataset, facts: CacheFacts, cn: Any) -> None:
    try:
        names = cn.classnames(ds.classnames, list(facts.classnames))
        cn.templates(ds.templates, facts.dataset or ds.name)
        subset = cn.subset_indices(ds.class_subset, list(facts.class_ids)) if ds.class_subset else None
    except cn.ClassListError as err:
        raise _refuse(i, suite, ds, facts.where, str(err), "fix classnames / templates / class_subset") from None
    n_data = len(facts.classnames or facts.class_ids)
    n_scored = len(subset) if subset is not None else len(names)
    if n_data and n_scored != n_data:
        what = f"class_subset {ds.class_subset}" if subset is not None else f"classnames {ds.classnames!r}"
        raise _refuse(i, suite, ds, facts.where, f"the cache has {n_data} classes but {what} gives {n_scored}",
                      "name the list that matches the cache (or a class_subset for ImageNet-R / -A)")
