"""Metric keys as the robustness papers tabulate them: pure and torch-free, so that `dodo table`
(cluster layer) and the eval suites (tasks layer, dodo/eval/results.py re-exports) share them.

Suite keys are ``eval.<kind>.<dataset>.<metric>`` and ``eval.<kind>.ood_mean.<metric>``
(dodo/eval/runner.py). ``dataset_tags`` goes into summary.json (``"eval_datasets"``) so a
table can mark each dataset ID or OOD; ``order_metric_keys`` orders columns: per suite, the ID
datasets, the OOD datasets, then the OOD mean (one column group per metric), other keys first.
The in-training keys of the contrastive families, ``eval.id.<metric>`` / ``eval.ood.<metric>``
(held-out split / OOD split), are read as datasets "id" / "ood" of a suite kind "heldout".
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

OOD_MEAN = "ood_mean"
HELDOUT_KIND = "heldout"  # the in-training eval.id.* / eval.ood.* keys


def split_key(key: str) -> tuple[str, str, str] | None:
    """"eval.zeroshot.imagenet_r.top1" -> ("zeroshot", "imagenet_r", "top1"); None for other keys."""
    from dodo.eval.config import KINDS

    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "eval" and parts[1] in KINDS:
        return parts[1], parts[2], parts[3]
    return None


def split_any(key: str) -> tuple[str, str, str] | None:
    """split_key, and also "eval.id.ir_r1" -> ("heldout", "id", "ir_r1") (in-training splits)."""
    parts = split_key(key)
    if parts is None:
        bits = key.split(".")
        if len(bits) == 3 and bits[0] == "eval" and bits[1] in ("id", "ood"):
            return HELDOUT_KIND, bits[1], bits[2]
    return parts


def dataset_tags(suites: Sequence[Any]) -> dict[str, dict[str, str]]:
    """{kind: {dataset: "id" | "ood"}} for summary.json; the shapes suite's implicit OOD set included.
    ``suites``: EvalSuite objects or their plain mappings (a run's config.yaml)."""
    def get(obj: Any, name: str, default: Any = None) -> Any:
        return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)

    out: dict[str, dict[str, str]] = {}
    for suite in suites:
        kind = get(suite, "kind", "retrieval")
        tags = out.setdefault(kind, {})
        for ds in get(suite, "datasets", None) or [{}]:
            tags[get(ds, "name", "heldout")] = get(ds, "tag", "id")
        if kind == "shapes" and get(suite, "ood_holdout", None) != [] and "ood" not in tags.values():
            tags["ood"] = "ood"
    return out


def tag_of(kind: str, name: str, tags: dict[str, dict[str, str]] | None) -> str:
    """"id" | "ood" | "mean" ("" when untagged); the in-training splits are tagged by name."""
    if name == OOD_MEAN:
        return "mean"
    if kind == HELDOUT_KIND:
        return name
    return (tags or {}).get(kind, {}).get(name, "")


def order_metric_keys(keys: Iterable[str], tags: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Other keys first (sorted), then suite keys by kind, metric, ID datasets, OOD datasets, OOD mean."""
    other, suite = [], []
    for key in set(keys):
        (suite if split_key(key) else other).append(key)

    def rank(key: str) -> tuple:
        kind, name, metric = split_key(key)  # type: ignore[misc]
        group = {"mean": 2, "ood": 1}.get(tag_of(kind, name, tags), 0)
        return kind, metric, group, name
    return sorted(other) + sorted(suite, key=rank)


def column_label(key: str, tags: dict[str, dict[str, str]] | None = None) -> str:
    """"eval.zeroshot.imagenet_r.top1" -> "zeroshot imagenet_r top1 (ood)" when tagged OOD."""
    parts = split_key(key)
    if parts is None:
        return key
    kind, name, metric = parts
    tag = tag_of(kind, name, tags)
    return f"{kind} {name} {metric}" + (f" ({tag})" if tag and tag != "mean" else "")
