"""`dodo sweep`: a grid of overrides, listed points, or listed points x a grid, as one job array.

    dodo sweep jobs/demo.yaml train.steps=200 --grid train.lr=1e-4,3e-4 train.seed=0,1
    dodo sweep jobs/clip_lora.yaml --point "lora: model.adapter.kind=lora" \
        --point "full: model.adapter.kind=none model.clip.trainable=[all]" --grid train.seed=0,1,2
    dodo sweep jobs/clip_lora.yaml --points methods.yaml --grid train.seed=0,1,2

Listed points (``--point "[LABEL:] key=value ..."``, repeatable, and/or ``--points FILE``, a YAML
list of override mappings, each with an optional ``name:`` label) are combined with the grid as
a product: every listed point runs at every grid combination (above: each method at 3 seeds).
Without --grid the listed points run as they are; without points, the grid alone.

Writes runs/<name>/sweep_<id>/ (sweep.json, job/ with the array script, and p0 ... pN-1, each a
complete run directory) and submits ONE job: a Slurm array (--array=0-N-1), an LSF array
(-J "name[1-N]"), or, locally, the points one after another. Every point's config is built and
checked before anything is written. Each point continues across allocations like a single run
(its own requeues). `dodo table SWEEP` collates the points (dodo/cluster/table.py).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dodo.config.errors import ConfigError
from dodo.config.loader import dump_config, load_job, parse_override
from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, read_json, write_json_atomic

# Keys a point may not set: every point of a sweep shares one job array (cluster), one folder
# (name, runs_dir).
FIXED = ("cluster", "name", "runs_dir")


@dataclass(frozen=True)
class Point:
    dir: str  # p0, p1, ...
    overrides: tuple[str, ...]  # the point's key=value (listed point first, then the grid's)
    values: dict[str, Any]
    name: str = ""  # a listed point's label (its `name:` / "LABEL:"), "" for grid points

    @property
    def label(self) -> str:
        shown = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in self.values.items())
        return " ".join(x for x in (self.dir, self.name, shown) if x)


@dataclass(frozen=True)
class Listed:
    """One listed point before the grid is applied: a label and its overrides."""
    name: str
    values: dict[str, Any]


def _check_key(key: str, where: str) -> None:
    if key.split(".")[0] in FIXED:
        raise ConfigError(f"{where} sets {key}: every point of a sweep runs in the same job array and "
                          f"folder, so {'/'.join(FIXED)} cannot vary; submit one sweep per setting")


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
        _check_key(key, f"--grid {spec!r}")
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


def parse_point(spec: str) -> Listed:
    """'lora: model.adapter.kind=lora train.lr=1e-3' -> Listed("lora", {...}); the label is optional."""
    try:
        tokens = shlex.split(spec)
    except ValueError as err:
        raise ConfigError(f"--point {spec!r}: {err}; quote values with spaces") from None
    name = ""
    if tokens and tokens[0].endswith(":") and "=" not in tokens[0]:
        name = tokens.pop(0)[:-1]
    if not tokens and not name:
        raise ConfigError("--point '' is empty; give key=value overrides, e.g. --point \"lora: "
                          "model.adapter.kind=lora\" (a label alone, \"base:\", is the job as it is)")
    values: dict[str, Any] = {}
    for token in tokens:
        if "=" not in token:
            raise ConfigError(f"--point {spec!r}: {token!r} is not key.path=value; write "
                              f"--point \"[LABEL:] key=value key=value\"")
        key, value = parse_override(token)
        _check_key(key, f"--point {spec!r}")
        if key in values:
            raise ConfigError(f"--point {spec!r} sets {key} twice")
        values[key] = value
    return Listed(name, values)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def read_points_file(path: str) -> list[Listed]:
    """A YAML list of override mappings (nested or dotted keys), each with an optional `name:`."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--points {path}: no such file; write a YAML list such as "
                          f"'- {{name: lora, model.adapter.kind: lora}}'")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--points {path}: not YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--points {path}: expected a non-empty YAML list of mappings, one per point, "
                          f"e.g. '- {{name: lora, model.adapter.kind: lora}}'")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise ConfigError(f"--points {path}: item {i} is {type(item).__name__}, not a mapping of "
                              f"key: value overrides")
        item = dict(item)
        name = item.pop("name", "")
        if not isinstance(name, (str, int, float)):
            raise ConfigError(f"--points {path}: item {i}: name must be a short label, got {name!r}")
        values = _flatten(item)
        for key in values:
            if not all(key.split(".")):
                raise ConfigError(f"--points {path}: item {i}: key {key!r} is malformed")
            _check_key(key, f"--points {path}: item {i}")
        out.append(Listed(str(name), values))
    return out


def listed_points(specs: list[str], points_file: str | None) -> list[Listed]:
    """--point specs then the points file, checked: unique labels, no point given twice."""
    listed = [parse_point(s) for s in specs] + (read_points_file(points_file) if points_file else [])
    seen_names: dict[str, int] = {}
    seen_values: dict[str, int] = {}
    for i, p in enumerate(listed):
        if p.name and p.name in seen_names:
            raise ConfigError(f"listed points {seen_names[p.name]} and {i} share the label {p.name!r}; "
                              f"give each point its own label")
        same = json.dumps(p.values, sort_keys=True, default=str)
        if same in seen_values:
            raise ConfigError(f"listed points {seen_values[same]} and {i} set the same overrides "
                              f"({_show(p.values) or 'none'}); a point given twice would run twice")
        seen_names[p.name] = seen_values[same] = i
    return listed


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def expand(grid: list[tuple[str, list[Any]]], listed: list[Listed] | None = None) -> list[Point]:
    """Listed points x the grid's product (either may be absent), numbered p0, p1, ..."""
    combos = list(itertools.product(*(values for _, values in grid)))
    bases = listed or [Listed("", {})]
    for base in bases:
        for key, _ in grid:
            if key in base.values:
                raise ConfigError(f"listed point {base.name or _show(base.values)!r} sets {key}, which "
                                  f"--grid varies too; set it in one place only")
    total = len(bases) * len(combos)
    width = len(str(total - 1))
    points = []
    for i, (base, combo) in enumerate(itertools.product(bases, combos)):
        values = {**base.values, **{key: v for (key, _), v in zip(grid, combo)}}
        overrides = tuple(_override(k, v) for k, v in values.items())
        points.append(Point(f"p{i:0{width}d}", overrides, values, base.name))
    return points


def plan(grid_specs: list[str], point_specs: list[str] = (), points_file: str | None = None
         ) -> tuple[list[tuple[str, list[Any]]], list[Listed], list[Point]]:
    """The grid, the listed points and every point of a sweep; refuses bad input (ConfigError)."""
    if not grid_specs and not point_specs and not points_file:
        raise ConfigError("dodo sweep needs --grid KEY=V1,V2, --point \"[LABEL:] k=v ...\" or --points FILE")
    grid = parse_grid(list(grid_specs))
    listed = listed_points(list(point_specs), points_file)
    return grid, listed, expand(grid, listed)


@dataclass(frozen=True)
class Sweep:
    path: Path
    points: tuple[Point, ...]
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    listed: int = 0  # how many listed points (0: a grid sweep)

    @property
    def file(self) -> Path:
        return self.path / "sweep.json"

    @property
    def job(self) -> Path:
        return self.path / "job"

    def runs(self) -> list[RunDir]:
        return [RunDir(self.path / p.dir) for p in self.points]

    def keys(self) -> list[str]:
        """Every key some point sets, in order of first appearance (the table's columns)."""
        return list(dict.fromkeys(k for p in self.points for k in p.values))

    def title(self) -> str:
        data = read_json(self.file, {})
        over = " x ".join(([f"{self.listed} listed"] if self.listed else []) + [k for k, _ in self.grid])
        job = f", {data.get('backend', '?')} job {data.get('job_id', '-')}" if data.get("job_id") else ""
        return f"sweep {self.path.parent.name}/{self.path.name}: {len(self.points)} points over {over}{job}"

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Sweep":
        folder = Path(path).resolve()
        data = read_json(folder / "sweep.json")
        if data is None:
            raise FileNotFoundError(f"{path} is not a dodo sweep (no sweep.json); pass a folder printed "
                                    f"by `dodo sweep`, e.g. runs/<name>/sweep_<id>")
        points = tuple(Point(p["dir"], tuple(p["overrides"]), p["values"], p.get("name", ""))
                       for p in data["points"])
        grid = tuple((k, tuple(v)) for k, v in data["grid"])
        return cls(folder, points, grid, len(data.get("listed", [])))


def build_configs(job: str, overrides: list[str], points: list[Point],
                  cluster_profile: str | None) -> list[JobConfig]:
    """Every point's config, each checked (ConfigError names the point)."""
    configs = []
    for point in points:
        try:
            configs.append(load_job(job, [*overrides, *point.overrides], cluster_profile=cluster_profile))
        except ConfigError as err:
            raise ConfigError(f"sweep point {point.label}: {err}") from None
    return configs


def create(job: str, overrides: list[str], grid_specs: list[str], cluster_profile: str | None,
           point_specs: list[str] = (), points_file: str | None = None,
           configs: list[JobConfig] | None = None) -> tuple[Sweep, list[JobConfig]]:
    """Check every point's config, then write the sweep folder whole (staged, then renamed)."""
    grid, listed, points = plan(grid_specs, point_specs, points_file)
    configs = configs or build_configs(job, overrides, points, cluster_profile)
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
            "listed": [{"name": p.name, "values": p.values} for p in listed],
            "points": [{"dir": p.dir, "name": p.name, "overrides": list(p.overrides), "values": p.values}
                       for p in points]})
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


def table(sweep: Sweep) -> tuple[list[str], list[list[str]]]:
    """One row per point (dodo/cluster/table.py has the other layouts)."""
    from dodo.cluster.table import points_table
    from dodo.status import effective_state

    return points_table(sweep, effective_state)


def write_table(sweep: Sweep, layout: str = "points", **options: Any) -> str:
    from dodo.cluster.table import write_table as write
    from dodo.status import effective_state

    return write(sweep, layout, effective_state, **options)


def _show(values: Mapping[str, Any]) -> str:
    return " ".join(_override(k, v) for k, v in values.items())


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
