"""`dodo sweep` and `dodo table`: a grid of overrides as one job array, one run per point.

    dodo sweep jobs/demo.yaml train.steps=200 --grid train.lr=1e-4,3e-4 train.seed=0,1

writes runs/<name>/sweep_<id>/ (sweep.json, job/ with the array script, and p0 ... pN-1,
each a complete run directory) and submits ONE job: a Slurm array (--array=0-N-1), an LSF
array (-J "name[1-N]"), or, locally, the points one after another. Every point's config is
built and checked before anything is written. Each point continues across allocations like a
single run (its own requeues). `dodo table SWEEP` collates the points' summary.json files.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dodo.config.errors import ConfigError
from dodo.config.loader import dump_config, load_job, parse_override
from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, read_json, write_atomic, write_json_atomic


@dataclass(frozen=True)
class Point:
    dir: str  # p0, p1, ...
    overrides: tuple[str, ...]  # the grid's key=value for this point
    values: dict[str, Any]

    @property
    def label(self) -> str:
        shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in self.values.items())
        return f"{self.dir} {shown}"


def parse_grid(specs: list[str]) -> list[tuple[str, list[Any]]]:
    """["train.lr=1e-4,3e-4", ...] -> [("train.lr", [1e-4, 3e-4]), ...]; values read as YAML."""
    grid: list[tuple[str, list[Any]]] = []
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {spec!r} is malformed; expected key.path=v1,v2,..., "
                              f"e.g. --grid train.lr=1e-4,3e-4")
        if key == "cluster" or key.startswith("cluster."):
            raise ConfigError(f"--grid {spec!r}: every point of a sweep runs in the same job array, so "
                              f"cluster settings cannot vary; submit one sweep per cluster setting")
        if any(k == key for k, _ in grid):
            raise ConfigError(f"--grid names {key} twice; give all its values at once: {key}=a,b,c")
        values = [parse_override(f"{key}={text}")[1] for text in _split_values(raw)]
        grid.append((key, values))
    return grid


def _split_values(raw: str) -> list[str]:
    """Split on commas outside [] so that list values ([a, b]) stay whole."""
    parts, depth, current = [], 0, ""
    for ch in raw:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if any(not p.strip() for p in parts):
        raise ConfigError(f"--grid value list {raw!r} has an empty value; write v1,v2,v3")
    return [p.strip() for p in parts]


def expand(grid: list[tuple[str, list[Any]]]) -> list[Point]:
    combos = list(itertools.product(*(values for _, values in grid)))
    width = len(str(len(combos) - 1))
    points = []
    for i, combo in enumerate(combos):
        values = {key: v for (key, _), v in zip(grid, combo)}
        overrides = tuple(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items())
        points.append(Point(f"p{i:0{width}d}", overrides, values))
    return points


@dataclass(frozen=True)
class Sweep:
    path: Path
    points: tuple[Point, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]

    @property
    def file(self) -> Path:
        return self.path / "sweep.json"

    @property
    def job(self) -> Path:
        return self.path / "job"

    def runs(self) -> list[RunDir]:
        return [RunDir(self.path / p.dir) for p in self.points]

    def title(self) -> str:
        data = read_json(self.file, {})
        keys = " x ".join(k for k, _ in self.grid)
        job = f", {data.get('backend', '?')} job {data.get('job_id', '-')}" if data.get("job_id") else ""
        return f"sweep {self.path.parent.name}/{self.path.name}: {len(self.points)} points over {keys}{job}"

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Sweep":
        folder = Path(path).resolve()
        data = read_json(folder / "sweep.json")
        if data is None:
            raise FileNotFoundError(f"{path} is not a dodo sweep (no sweep.json); pass a folder printed "
                                    f"by `dodo sweep`, e.g. runs/<name>/sweep_<id>")
        points = tuple(Point(p["dir"], tuple(p["overrides"]), p["values"]) for p in data["points"])
        grid = tuple((k, tuple(v)) for k, v in data["grid"])
        return cls(folder, points, grid)


def create(job: str, overrides: list[str], grid_specs: list[str],
           cluster_profile: str | None) -> tuple[Sweep, list[JobConfig]]:
    """Check every point's config, then write the sweep folder whole (staged, then renamed)."""
    grid = parse_grid(grid_specs)
    points = expand(grid)
    configs = []
    for point in points:
        try:
            configs.append(load_job(job, [*overrides, *point.overrides], cluster_profile=cluster_profile))
        except ConfigError as err:
            raise ConfigError(f"sweep point {point.label}: {err}") from None
    first = configs[0]
    parent = Path(first.runs_dir).resolve() / first.name
    parent.mkdir(parents=True, exist_ok=True)
    sweep_id = "sweep_" + time.strftime("%Y-%m-%d_%H%M%S") + "_" + secrets.token_hex(2)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{sweep_id}."))
    try:
        (staging / "job" / "logs").mkdir(parents=True)
        for point, cfg in zip(points, configs):
            made = RunDir.create(staging.parent, staging.name, dump_config(cfg))
            os.rename(made.path, staging / point.dir)
        write_json_atomic(staging / "sweep.json", {
            "name": first.name, "job": str(job), "overrides": overrides, "created": time.time(),
            "grid": [[k, v] for k, v in grid],
            "points": [{"dir": p.dir, "overrides": list(p.overrides), "values": p.values} for p in points]})
        final = parent / sweep_id
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Sweep.open(final), configs


def remove(sweep: Sweep) -> None:
    """A sweep whose submission failed: leave nothing behind."""
    shutil.rmtree(sweep.path, ignore_errors=True)


def record_submission(sweep: Sweep, backend: str, job_id: str) -> None:
    data = read_json(sweep.file, {})
    data.update(backend=backend, job_id=job_id)
    write_json_atomic(sweep.file, data)


# ---------------------------------------------------------------- dodo table


def table(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """Header and one row per point: grid values, state, step, final metrics."""
    from dodo.status import effective_state

    summaries = [read_json(run.summary_file, {}) for run in sweep.runs()]
    metric_keys = sorted({k for s in summaries for k in s.get("final", {})})
    header = ["point"] + [k for k, _ in sweep.grid] + ["state", "step", "final train loss"] + metric_keys
    rows = []
    for point, run, summary in zip(sweep.points, sweep.runs(), summaries):
        status = run.status()
        final = summary.get("final", {})
        rows.append([point.dir] + [_fmt(point.values[k]) for k, _ in sweep.grid]
                    + [effective_state(run), str(status.get("step", 0)),
                       _num(summary.get("final_train_loss"))] + [_num(final.get(k)) for k in metric_keys])
    return header, rows


def write_table(sweep: Sweep) -> str:
    """table.md and table.csv in the sweep folder; returns the markdown."""
    header, rows = table(sweep)
    md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    write_atomic(sweep.path / "table.md", md)
    write_atomic(sweep.path / "table.csv", buf.getvalue())
    return md


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
