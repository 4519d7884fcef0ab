"""Run the evaluation suites of a job: pure functions over the family's callables + datasets.

The family wires itself in with a ``SuiteHooks`` (dodo/models/<family>: its eval hooks bound
to the model) and calls ``run_suites``; metrics come back as
    eval.<kind>.<dataset>.<metric>      e.g. eval.retrieval.coco_5k.t2i_r1, eval.zeroshot.imagenet.top1
    eval.<kind>.ood_mean.<metric>       the mean over the suite's datasets tagged ood
Every rank may call it (the metrics are identical); rank 0 is enough for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from dodo.eval.config import EvalDataset, EvalSuite
from dodo.eval.suites import KINDS


@dataclass
class SuiteHooks:
    """The family's callables (bound to the model) and the run's own splits."""
    open_cache: Callable[[str], Any]  # a cache path -> its dataset of Samples
    heldout: Any  # the run's held-out split (dataset `cache: ""`)
    train: Any = None  # the run's training split: the kNN / probe bank when train_cache is ""
    encode_images: Optional[Callable] = None  # (B, H, W, 3) uint8 tensor -> (B, D)
    encode_texts: Optional[Callable] = None  # list[str] -> (B, D)
    generate: Optional[Callable] = None  # (list of (H, W, 3) uint8 images, **decoding) -> list[str]
    describe: Optional[Callable[[str], Any]] = None  # a cache path -> its Manifest (class names)
    shapes_ood: Optional[Callable[[EvalSuite], Any]] = None  # shapes: the OOD pool (see shapes.py)
    cache: dict = field(default_factory=dict)  # opened datasets, by path


def _open(hooks: SuiteHooks, path: str) -> Any:
    if not path:
        return hooks.heldout
    if path not in hooks.cache:
        hooks.cache[path] = hooks.open_cache(path)
    return hooks.cache[path]


def _manifest(hooks: SuiteHooks, path: str) -> Any:
    return hooks.describe(path) if (hooks.describe and path) else None


def run_dataset(suite: EvalSuite, ds: EvalDataset, hooks: SuiteHooks) -> dict[str, float]:
    """One suite on one dataset -> {metric: value}."""
    from dodo.eval import classnames as cn

    test = _open(hooks, ds.cache)
    if suite.kind == "retrieval":
        from dodo.eval.retrieval import run_retrieval
        return run_retrieval(hooks.encode_images, hooks.encode_texts, test, suite.ks, ds.limit)
    if suite.kind == "zeroshot":
        from dodo.eval.zeroshot import run_zeroshot
        m = _manifest(hooks, ds.cache)
        names = cn.classnames(ds.classnames, list(getattr(m, "classnames", []) or []))
        temps = cn.templates(ds.templates, getattr(m, "dataset", "") or ds.name)
        subset = cn.subset_indices(ds.class_subset, list(getattr(m, "class_ids", []) or [])) \
            if ds.class_subset else None
        ks = [1, 5] if suite.ks == [1, 5, 10] else suite.ks  # the default ks: top1 / top5
        return run_zeroshot(hooks.encode_images, hooks.encode_texts, test, names, temps, subset, ks, ds.limit)
    if suite.kind in ("knn", "linear_probe"):
        train = _open(hooks, ds.train_cache) if ds.train_cache else hooks.train
        if suite.kind == "knn":
            from dodo.eval.knn import run_knn
            return run_knn(hooks.encode_images, train, test, suite.k, suite.temperature, suite.bank, ds.limit)
        from dodo.eval.linear_probe import run_linear_probe
        return run_linear_probe(hooks.encode_images, train, test, suite.probe_c, suite.probe_max_iter,
                                suite.bank, ds.limit)
    if suite.kind == "captioning":
        from dodo.eval.caption_metrics import run_captioning
        settings = decoding(suite)
        return run_captioning(lambda images: hooks.generate(images, **settings), test, ds.limit)
    if suite.kind == "shapes":
        return run_shapes(suite, ds, test, hooks)
    raise ValueError(f"unknown suite kind {suite.kind!r}; one of {sorted(KINDS)}")


def decoding(suite: EvalSuite) -> dict[str, Any]:
    """The captioning suite's decoding options as dodo.eval.generate.Decoding's fields (what the
    family's generate hook takes); max_tokens only when set (else the family's default)."""
    out: dict[str, Any] = {"method": suite.decoding}
    if suite.decoding == "beam":
        out["beams"] = suite.beams
    if suite.decoding == "sample":
        out.update(temperature=suite.sample_temperature, top_k=suite.top_k, top_p=suite.top_p)
    if suite.max_tokens:
        out["max_tokens"] = suite.max_tokens
    return out


def run_shapes(suite: EvalSuite, ds: EvalDataset, test: Any, hooks: SuiteHooks) -> dict[str, float]:
    """The shapes scoring on one dataset: contrastive families get retrieval + zero-shot over the
    18 classes, captioning families the share of captions naming the right colour and shape."""
    from dodo.eval import classnames as cn, shapes

    holdout = set(suite.ood_holdout if suite.ood_holdout is not None else shapes.DEFAULT_HOLDOUT)
    keep_held = ds.tag == "ood"
    idx = shapes.split_by_holdout(test, holdout, keep_held, ds.limit) if holdout else \
        list(range(len(test) if not ds.limit else min(ds.limit, len(test))))
    samples = [test[i] for i in idx]
    if not samples:
        return {}
    templates = cn.templates(ds.templates) if ds.templates else shapes.DEFAULT_TEMPLATES
    if hooks.encode_images is not None and hooks.encode_texts is not None:
        return shapes.shapes_contrastive(hooks.encode_images, hooks.encode_texts, samples, suite.ks, templates)
    return shapes.shapes_captioning(hooks.generate, samples)


def shapes_datasets(suite: EvalSuite) -> list[EvalDataset]:
    """The shapes suite measures its held-out data twice: ID (combinations seen in training) and,
    with a holdout, OOD (the held-out combinations) as a dataset named "ood" from the OOD pool."""
    out = list(suite.datasets)
    if suite.ood_holdout != [] and not any(d.tag == "ood" for d in out):
        out.append(EvalDataset(name="ood", cache="", tag="ood", limit=suite.num_ood))
    return out


def ood_means(metrics: dict[str, dict[str, float]], tags: dict[str, str]) -> dict[str, float]:
    """{metric: mean over the OOD datasets that report it}."""
    ood = [m for name, m in metrics.items() if tags.get(name) == "ood"]
    keys = sorted({k for m in ood for k in m})
    return {k: sum(m[k] for m in ood if k in m) / sum(k in m for m in ood) for k in keys}


def run_suites(suites: Sequence[EvalSuite], hooks: SuiteHooks) -> dict[str, float]:
    """Every suite on every dataset -> flat ``eval.<kind>.<dataset>.<metric>`` keys (+ ood_mean)."""
    out: dict[str, float] = {}
    for suite in suites:
        per: dict[str, dict[str, float]] = {}
        tags = {}
        datasets = shapes_datasets(suite) if suite.kind == "shapes" else suite.datasets
        for ds in datasets:
            if suite.kind == "shapes" and ds.name == "ood" and ds.cache == "" and hooks.shapes_ood is not None:
                per[ds.name] = run_shapes(suite, ds, hooks.shapes_ood(suite), hooks)
            else:
                per[ds.name] = run_dataset(suite, ds, hooks)
            tags[ds.name] = ds.tag
        for name, m in per.items():
            out.update({f"eval.{suite.kind}.{name}.{k}": v for k, v in m.items()})
        if "ood" in tags.values():
            out.update({f"eval.{suite.kind}.ood_mean.{k}": v for k, v in ood_means(per, tags).items()})
    return out
