"""Suite results as the robustness papers tabulate them (torch-free: `dodo table` reads them).

Metric keys are ``eval.<kind>.<dataset>.<metric>`` and ``eval.<kind>.ood_mean.<metric>``.
``dataset_tags`` goes into summary.json (``"eval_datasets"``) so a table can mark each
dataset ID or OOD; ``order_metric_keys`` orders columns: per suite, the ID datasets, the OOD
datasets, then the OOD mean (one column group per metric), other keys first as they were.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

OOD_MEAN = "ood_mean"


def split_key(key: str) -> tuple[str, str, str] | None:
    """"eval.zeroshot.imagenet_r.top1" -> ("zeroshot", "imagenet_r", "top1"); None for other keys."""
    from dodo.eval.config import KINDS

    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "eval" and parts[1] in KINDS:
        return parts[1], parts[2], parts[3]
    return None


def dataset_tags(suites: Sequence[Any]) -> dict[str, dict[str, str]]:
    """{kind: {dataset: "id" | "ood"}} for summary.json; the shapes suite's implicit OOD set included."""
    out: dict[str, dict[str, str]] = {}
    for suite in suites:
        tags = out.setdefault(suite.kind, {})
        for ds in suite.datasets:
            tags[ds.name] = ds.tag
        if suite.kind == "shapes" and suite.ood_holdout != [] and "ood" not in tags.values():
            tags["ood"] = "ood"
    return out


def order_metric_keys(keys: Iterable[str], tags: dict[str, dict[str, str]] | None = None) -> list[str]:
    """Other keys first (sorted), then suite keys by kind, metric, ID datasets, OOD datasets, OOD mean."""
    tags = tags or {}
    other, suite = [], []
    for key in set(keys):
        (suite if split_key(key) else other).append(key)

    def rank(key: str) -> tuple:
        kind, name, metric = split_key(key)  # type: ignore[misc]
        group = 2 if name == OOD_MEAN else (1 if tags.get(kind, {}).get(name) == "ood" else 0)
        return kind, metric, group, name
    return sorted(other) + sorted(suite, key=rank)


def column_label(key: str, tags: dict[str, dict[str, str]] | None = None) -> str:
    """"eval.zeroshot.imagenet_r.top1" -> "zeroshot imagenet_r top1 (ood)" when tagged OOD."""
    parts = split_key(key)
    if parts is None:
        return key
    kind, name, metric = parts
    tag = "mean" if name == OOD_MEAN else (tags or {}).get(kind, {}).get(name, "")
    return f"{kind} {name} {metric}" + (f" ({tag})" if tag and name != OOD_MEAN else "")
