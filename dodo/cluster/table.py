"""`dodo table`: a sweep's (or a chain's) runs collated, laid out as the seeds' papers do.

    dodo table SWEEP                      one row per point: its values, state, step, every metric
    dodo table SWEEP --layout methods     one row per method; points that differ only in their
                                          seed (SEED_KEYS) are one row, each cell mean ± std
    dodo table SWEEP --layout retrieval   method rows; T->I and I->T R@1/5/10 per retrieval set
    dodo table SWEEP --layout idood --metric top1
                                          method rows; the metric on each ID dataset, each OOD
                                          dataset, then the OOD mean

Every layout has a trainable-parameters column (summary.json's trainable_parameters). A row's
label is the point's name (a listed point's label) with its other non-seed values, or its
overrides. Datasets are tagged ID / OOD from summary.json's "eval_datasets", else from the run's
config.yaml (eval.suites). Recall / accuracy metrics are shown in percent in the method layouts.
Sample standard deviation (n - 1); a cell with one seed shows the value alone.

``--rescored``: where a run has <run>/eval/suites.json (`dodo eval RUN --task suites`, the
job's suites rerun on the final checkpoint, e.g. after a metric was fixed), its keys replace
those of summary.json's "final"; the other keys stay as training recorded them.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

from dodo.config.metric_keys import (HELDOUT_KIND, OOD_MEAN, column_label, dataset_tags, order_metric_keys,
                                     split_any, tag_of)
from dodo.rundir import RunDir, read_json, write_atomic

LAYOUTS = ("points", "methods", "retrieval", "idood")
# Keys whose values are "seeds": points that differ only in them are one method row. train.seed
# seeds the training RNG (dropout); data.seed the data order (and the synthetic data);
# model.init_seed the random-init weights (tiny random-init towers: the frozen base and the
# adapters' initialisation). Without dropout only the last two make runs differ.
# model.prompt.shot_seed draws a few-shot training set (prompt learning's replicates).
SEED_KEYS = ("train.seed", "data.seed", "model.init_seed", "model.prompt.shot_seed")
PERCENT = re.compile(r"(^|_)(r\d+|r_mean|top\d+|accuracy|acc|hm)$")  # hm: harmonic mean of top-1s
# The two retrieval directions: suite keys (t2i/i2t) and the in-training ones (ir = t2i, tr = i2t).
DIRECTIONS = (("T→I", ("t2i_r", "ir_r")), ("I→T", ("i2t_r", "tr_r")))


@dataclass
class Entry:
    """One run of the collection: its id (p3, a stage), row label, seed and results."""
    id: str
    method: str
    seed: Any
    run: RunDir
    values: dict[str, Any] = field(default_factory=dict)  # the point's overrides (points layout)
    group: str = ""  # what makes a method row (the label may shorten keys); "" = the label
    rescored: bool = False  # overlay eval/suites.json on "final" (module docstring)

    @property
    def key(self) -> str:
        return self.group or self.method

    @property
    def summary(self) -> dict:
        summary = read_json(self.run.summary_file, {}) or {}
        again = read_json(self.run.path / "eval" / "suites.json", {}) if self.rescored and summary else {}
        if again.get("final"):
            summary["final"] = {**summary.get("final", {}), **again["final"]}
        return summary

    def tags(self) -> dict[str, dict[str, str]]:
        recorded = self.summary.get("eval_datasets")
        if recorded:
            return recorded
        import yaml

        try:
            tree = yaml.safe_load(self.run.config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        return dataset_tags(((tree.get("eval") or {}).get("suites")) or [])


def entries(collection: Any, rescored: bool = False) -> list[Entry]:
    """A Sweep's points, or anything with an ``entries()`` method (a Chain)."""
    out = _entries(collection)
    for e in out:
        e.rescored = rescored
    return out


def _entries(collection: Any) -> list[Entry]:
    if hasattr(collection, "entries"):
        return collection.entries()
    out = []
    short = _short_names({k for p in collection.points for k in p.values})
    for point, run in zip(collection.points, collection.runs()):
        rest = {k: v for k, v in point.values.items() if k not in SEED_KEYS}
        shown = " ".join(f"{short[k]}={_fmt(v)}" for k, v in rest.items()
                         if not point.name or k not in _listed_keys(collection, point))
        method = " ".join(x for x in (point.name, shown) if x) or "(the job as it is)"
        seed = tuple(point.values.get(k) for k in SEED_KEYS if k in point.values)
        group = json.dumps([point.name, rest], sort_keys=True, default=str)  # not the label: short keys may clash
        out.append(Entry(point.dir, method, seed, run, point.values, group))
    return out


def _short_names(keys: set[str]) -> dict[str, str]:
    """Each key by its last component, or as many as tell it apart: adapter.dropout, lora.dropout."""
    out = {}
    for key in keys:
        parts = key.split(".")
        n = 1
        while n < len(parts) and any(o != key and o.split(".")[-n:] == parts[-n:] for o in keys):
            n += 1
        out[key] = ".".join(parts[-n:])
    return out


def _listed_keys(collection: Any, point: Any) -> set[str]:
    grid = {k for k, _ in getattr(collection, "grid", ())}
    return {k for k in point.values if k not in grid}


# ---------------------------------------------------------------- layouts


def points_table(collection: Any, state_of: Callable[[RunDir], str] | None = None, rescored: bool = False
                 ) -> tuple[list[str], list[list[str]]]:
    """Header and one row per point: its values, state, step, trainable parameters, final metrics.
    ``state_of``: the run's state as `dodo status` tells it (passed in: dodo.status is cli-level)."""
    state_of = state_of or (lambda run: run.status().get("state", "unknown"))
    rows_in = entries(collection, rescored)
    keys = list(dict.fromkeys(k for e in rows_in for k in e.values))
    summaries = [e.summary for e in rows_in]
    tags = _merged_tags(rows_in)
    metric_keys = order_metric_keys({k for s in summaries for k in s.get("final", {})}, tags)
    header = (["point"] + keys + ["state", "step", "trainable params", "final train loss"]
              + [column_label(k, tags) for k in metric_keys])
    rows = []
    for e, summary in zip(rows_in, summaries):
        final = summary.get("final", {})
        rows.append([e.id] + [_fmt(e.values[k]) if k in e.values else "-" for k in keys]
                    + [state_of(e.run), str(e.run.status().get("step", 0)),
                       _int(summary.get("trainable_parameters")), _num(summary.get("final_train_loss"))]
                    + [_num(final.get(k)) for k in metric_keys])
    return header, rows


def method_table(collection: Any, layout: str = "methods", metric: str = "", metrics: list[str] = (),
                 dataset: str = "", rescored: bool = False) -> tuple[list[str], list[list[str]]]:
    """One row per method (seeds grouped): seeds, trainable params, then the layout's columns."""
    rows_in = entries(collection, rescored)
    groups: dict[str, list[Entry]] = {}
    for e in rows_in:
        groups.setdefault(e.key, []).append(e)
    finals = {e.id: e.summary.get("final", {}) for e in rows_in}
    tags = _merged_tags(rows_in)
    keys = {k for f in finals.values() for k in f}
    if layout == "retrieval":
        columns = retrieval_columns(keys, dataset)
    elif layout == "idood":
        columns = idood_columns(keys, tags, metric, dataset)
    else:
        chosen = [k for k in order_metric_keys(keys, tags)
                  if not metrics or any(fnmatch.fnmatchcase(k, p) for p in metrics)]
        columns = [(column_label(k, tags), k) for k in chosen]
    if not columns:
        raise FileNotFoundError(f"no run of {getattr(collection, 'path', 'this collection')} has metrics for "
                                f"--layout {layout}{f' --metric {metric}' if metric else ''} yet (keys seen: "
                                f"{', '.join(sorted(keys)[:12]) or 'none: no summary.json'})")
    header = ["method", "seeds", "trainable params"] + [label for label, _ in columns]
    rows = []
    for members in groups.values():
        method = members[0].method
        done = [e for e in members if finals[e.id]]
        seeds = str(len(done)) if len(done) == len(members) else f"{len(done)} of {len(members)} done"
        params = [e.summary.get("trainable_parameters") for e in done]
        params = [p for p in params if isinstance(p, (int, float))]
        cells = [_mean_std([finals[e.id][key] for e in done if key in finals[e.id]], key) for _, key in columns]
        if done and all(c == "-" for c in cells):
            continue  # finished runs that do not measure these columns (a chain's pretext stages)
        rows.append([method, seeds, _int(statistics.mean(params)) if params else "-"] + cells)
    return header, rows


def retrieval_columns(keys: set[str], dataset: str = "") -> list[tuple[str, str]]:
    """(label, key) for T->I then I->T R@k of each retrieval source: the suites' datasets (the
    retrieval suite's, or any suite reporting recall both ways, e.g. shapes), else the in-training
    held-out splits (id, ood). ``dataset`` keeps one dataset (or one suite kind)."""
    stems = tuple(stem for _, pair in DIRECTIONS for stem in pair)
    sources: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        parts = split_any(key)
        if parts and parts[1] != OOD_MEAN and parts[2].startswith(stems):
            sources.setdefault(parts[:2], set()).add(parts[2])
    suites = [s for s in sources if s[0] != HELDOUT_KIND]
    chosen = [s for s in (suites or list(sources)) if not dataset or dataset in s]
    chosen.sort(key=lambda s: (s[0] != "retrieval", s[0], s[1] == "ood", s[1]))
    kinds = {kind for kind, _ in chosen}
    out = []
    for kind, name in chosen:
        prefix = "eval." + (f"{kind}.{name}" if kind != HELDOUT_KIND else name)
        where = (f"{kind} " if len(kinds) > 1 else "") + (f"{name} " if len(chosen) > 1 else "")
        for arrow, pair in DIRECTIONS:
            found = sources[(kind, name)]
            ks = sorted({int(m[len(stem):]) for stem in pair for m in found
                         if m.startswith(stem) and m[len(stem):].isdigit()})
            for k in ks:
                stem = next(s for s in pair if f"{s}{k}" in found)
                out.append((f"{where}{arrow} R@{k}", f"{prefix}.{stem}{k}"))
    return out


def idood_columns(keys: set[str], tags: dict, metric: str = "", dataset: str = "") -> list[tuple[str, str]]:
    """(label, key): ``metric`` on each ID dataset, each OOD dataset, then the OOD mean, per suite
    kind (``dataset`` narrows to one kind). The default metric: top1 / r_mean / the first seen."""
    split = [(k, split_any(k)) for k in keys]
    split = [(k, p) for k, p in split if p and (not dataset or p[0] == dataset)]
    if not metric:
        seen = sorted({p[2] for _, p in split})
        metric = next((m for m in ("top1", "r_mean", "accuracy") if m in seen), seen[0] if seen else "")
    chosen = [(k, p) for k, p in split if p[2] == metric]
    kinds = {p[0] for _, p in chosen}
    if len(kinds) > 1 and HELDOUT_KIND in kinds:  # suites measured it: the in-training split is a repeat
        chosen = [(k, p) for k, p in chosen if p[0] != HELDOUT_KIND]
        kinds.discard(HELDOUT_KIND)
    order = {"id": 0, "": 0, "ood": 1, "mean": 2}

    def label(p: tuple[str, str, str]) -> str:
        kind, name, _ = p
        tag = tag_of(kind, name, tags)
        text = ("OOD mean" if tag == "mean" else name.upper() if kind == HELDOUT_KIND
                else f"{name} ({tag.upper() or 'untagged'})")
        return (f"{kind} " if len(kinds) > 1 else "") + f"{text} {metric}"
    chosen.sort(key=lambda kp: (kp[1][0], order.get(tag_of(kp[1][0], kp[1][1], tags), 0), kp[1][1]))
    return [(label(p), k) for k, p in chosen]


# ---------------------------------------------------------------- output


def write_table(collection: Any, layout: str = "points", state_of: Callable | None = None,
                **options: Any) -> str:
    """table.md / table.csv (table_<layout>.* for the method layouts) in the folder; the markdown."""
    if layout not in LAYOUTS:
        raise FileNotFoundError(f"--layout {layout}: no such layout; use one of {', '.join(LAYOUTS)}")
    if layout == "points":
        header, rows = points_table(collection, state_of, options.get("rescored", False))
    else:
        header, rows = method_table(collection, layout, **options)
    md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    stem = "table" if layout == "points" else f"table_{layout}"
    write_atomic(collection.path / f"{stem}.md", md)
    write_atomic(collection.path / f"{stem}.csv", buf.getvalue())
    return md


def _merged_tags(rows: list[Entry]) -> dict[str, dict[str, str]]:
    merged: dict[str, dict[str, str]] = {}
    for e in rows:
        for kind, tags in e.tags().items():
            merged.setdefault(kind, {}).update(tags)
    return merged


def _mean_std(values: list[float], key: str) -> str:
    values = [float(v) for v in values if isinstance(v, (int, float))]
    if not values:
        return "-"
    scale = 100.0 if PERCENT.search(key.rsplit(".", 1)[-1]) else 1.0
    mean = statistics.mean(values) * scale
    fmt = (lambda x: f"{x:.1f}") if scale == 100.0 else (lambda x: f"{x:.4g}")
    if len(values) == 1:
        return fmt(mean)
    return f"{fmt(mean)} ± {fmt(statistics.stdev(values) * scale)}"


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _int(value: Any) -> str:
    return f"{int(round(value)):,}" if isinstance(value, (int, float)) else "-"


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
