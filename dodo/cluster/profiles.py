"""Cluster profiles: hpc/clusters/<name>.yaml, the site half of a job's `cluster:` section.

A profile is a partial `cluster:` section (keys of ClusterConfig, without the `cluster:`
wrapper). A job names one with `cluster: summit` or `cluster: {profile: summit, nodes: 16}`.
Precedence, lowest first:

    ClusterConfig defaults < profile < the job's own cluster keys < key=value overrides

`dodo submit JOB --cluster NAME` moves a job to another machine: there the profile wins
over the job file's cluster keys (the demo's "2 local processes" means nothing on Summit),
and only command-line overrides beat it.

Profiles are looked up in $DODO_CLUSTERS (a folder, if set) and then in hpc/clusters/.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dodo.config.errors import ConfigError

PACKAGE_CLUSTERS = Path(__file__).resolve().parents[2] / "hpc" / "clusters"


def search_path() -> list[Path]:
    extra = os.environ.get("DODO_CLUSTERS")
    return ([Path(extra)] if extra else []) + [PACKAGE_CLUSTERS]


def available() -> list[str]:
    names = {p.stem for folder in search_path() if folder.is_dir() for p in folder.glob("*.yaml")}
    return sorted(names)


def find(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"cluster profile {name!r} is not a profile name; use one of: "
                          f"{', '.join(available()) or 'none'}")
    for folder in search_path():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    import difflib

    names = available()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    folders = " or ".join(str(f) for f in search_path())
    listed = ", ".join(f"{n} ({_backend_of(n)})" for n in names) or "none"
    raise ConfigError(f"unknown cluster profile {name!r}: no {name}.yaml in {folders}; available: "
                      f"{listed}{hint} (write your site's profile there, or set DODO_CLUSTERS to a "
                      f"folder of profiles)")


def _backend_of(name: str) -> str:
    import yaml

    for folder in search_path():
        path = folder / f"{name}.yaml"
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                return "unreadable"
            return str(data.get("backend", "auto")) if isinstance(data, dict) else "unreadable"
    return "?"


def apply(tree: dict, sources: dict[str, str], forced: str | None = None) -> None:
    """Merge the named profile into tree["cluster"] in place, with the precedence above."""
    from dodo.config.loader import _merge, _read_yaml  # the loader's own merging and messages

    section = tree.get("cluster")
    if isinstance(section, str):
        section = {"profile": section}
    elif section is None:
        section = {}
    elif not isinstance(section, Mapping):
        where = sources.get("cluster", "the job")
        raise ConfigError(f"{where}: cluster must be a profile name (cluster: slurm) or a mapping "
                          f"(cluster: {{profile: slurm, nodes: 2}}), got {section!r}")
    name = forced or section.get("profile") or ""
    if not name:
        return
    if not forced and _is_resolved(section):
        tree["cluster"] = dict(section)  # a run's config.yaml: complete, needs no profile file
        return
    if not isinstance(name, str):
        raise ConfigError(f"{sources.get('cluster.profile', 'the job')}: cluster.profile must be a "
                          f"profile name such as slurm, got {name!r}")
    path = find(name)
    profile = _read_yaml(path, _shown(path))
    if "profile" in profile or "cluster" in profile:
        raise ConfigError(f"{_shown(path)}: a profile lists cluster keys directly (nodes: 2, "
                          f"partition: gpu), without a 'cluster:' or 'profile:' key; remove it")
    job_keys = {k: v for k, v in section.items() if k != "profile"}
    job_sources = {k: v for k, v in sources.items() if k.startswith("cluster.")}
    merged: dict = {}
    merged_sources: dict[str, str] = {}
    layers = [(profile, _shown(path)), (job_keys, None)]
    if forced:
        layers.reverse()  # --cluster NAME: the profile beats the job file's cluster keys
    for data, source in layers:
        if source is None:  # the job's keys keep the file they came from
            for key, value in data.items():
                merged[key] = value
                merged_sources.update({k: v for k, v in job_sources.items()
                                       if k == f"cluster.{key}" or k.startswith(f"cluster.{key}.")})
        else:
            _merge(merged, data, source, merged_sources, "cluster")
    merged["profile"] = name
    for key in [k for k in sources if k == "cluster" or k.startswith("cluster.")]:
        del sources[key]
    sources.update(merged_sources)
    sources["cluster.profile"] = "--cluster" if forced else sources.get("cluster.profile", _shown(path))
    tree["cluster"] = merged


def _is_resolved(section: Mapping) -> bool:
    import dataclasses

    from dodo.cluster.config import ClusterConfig

    return {f.name for f in dataclasses.fields(ClusterConfig)} <= set(section)


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative
