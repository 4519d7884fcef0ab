"""`dodo chain CHAIN.yaml`: stages that take earlier stages' run directories as inputs, submitted
with scheduler dependencies (pretext stages then transfer; upcycling after a dense run).

    name: masked                       # optional (default: the file's stem)
    seeds: [0, 1, 2]                   # optional: the whole chain once per seed
    seed_key: data.seed                # optional: the key each seed sets (default; or model.init_seed, train.seed)
    overrides: {train.steps: 200}      # optional: every stage (a mapping or a list of k=v)
    stages:
      mim: {job: jobs/masked_adapters_mim.yaml}
      mlm: {job: jobs/masked_adapters_mlm.yaml, overrides: [train.lr=1e-3]}
      transfer:
        job: jobs/masked_adapters_transfer.yaml
        overrides:
          model.clip.init_adapters: ["${stages.mim.run_dir}", "${stages.mlm.run_dir}"]
        after: []                      # optional: more stages to wait for without taking their path

Every stage's run directory is created up front in runs/<name>/chain_<id>/<stage>[_s<seed>]/,
so `${stages.X.run_dir}` resolves to a known absolute path (a stage may name only stages listed
before it; with seeds, the same seed's run). Every stage's config is built and checked before
anything is written; a path that is a stage's run directory counts as present (MUST_EXIST keys
such as model.clip.init_adapters, model.moe.upcycle_from). Then each stage is submitted,
waiting for the stages it names: Slurm `--dependency=afterok:<ids> --kill-on-invalid-dep=yes`
(a failed stage's dependants are cancelled), LSF `-w 'done("<job name>") && ...' -ti` (by job
name, so that a stage continued by a chained follow-up job is waited for to its end; -ti ends
a dependant whose condition can no longer be met), local: in order, in the foreground, a stage
whose inputs failed is not started and says which stage failed and where its log is.
Job files are found relative to the current directory, else to the chain file's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dodo.cluster.table import SEED_KEYS
from dodo.config.errors import ConfigError
from dodo.config.loader import dump_config, load_job
from dodo.config.schema import JobConfig
from dodo.rundir import RunDir, read_json, write_json_atomic

REF = re.compile(r"\$\{([^}]*)\}")
STAGE_REF = re.compile(r"stages\.([A-Za-z0-9_-]+)\.run_dir")
NAME_OK = re.compile(r"[A-Za-z0-9_-]+")



@dataclass
class Stage:
    name: str
    job: str
    overrides: list[tuple[str, Any]]  # the file's key -> value, "${stages.X.run_dir}" unresolved
    deps: list[str]  # stages it waits for (named in its values, or `after:`)


@dataclass
class Instance:
    """One run of the chain: a stage at one seed (seed None: the job's own)."""
    stage: str
    seed: Any  # [seed_key, value] (None: the job's own seed)
    dir: str  # its folder in the chain folder: <stage> or <stage>_s<seed>
    deps: list[str] = field(default_factory=list)  # the instance dirs it waits for
    job_name: str = ""  # the config's name: the scheduler's job name (LSF waits on it)


def read_chain(path: str) -> tuple[str, list[Any], list[tuple[str, Any]], list[Stage]]:
    """(name, seeds, shared overrides, stages) of a chain file; ConfigError for bad input. The
    seeds come back as (seed_key, value) pairs, the shared overrides as (key, value) pairs."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"chain file {path} does not exist; write one as docs/clusters.md shows (stages: ...)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"chain file {path}: not YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("stages"), Mapping) or not data["stages"]:
        raise ConfigError(f"chain file {path}: expected a mapping with `stages:`, a mapping of stage name -> "
                          "{job: jobs/X.yaml, overrides: {...}}")
    unknown = set(data) - {"name", "seeds", "seed_key", "overrides", "stages"}
    if unknown:
        raise ConfigError(f"chain file {path}: unknown key {sorted(unknown)[0]!r}; the keys are name, seeds, "
                          "seed_key, overrides, stages")
    seed_key = data.get("seed_key", "data.seed")  # train.seed alone only seeds dropout
    if seed_key not in SEED_KEYS:
        raise ConfigError(f"chain file {path}: seed_key must be one of {', '.join(SEED_KEYS)}, got {seed_key!r}")
    name = str(data.get("name") or file.stem)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"chain file {path}: name {name!r} must be letters, digits, '-', '_' or '.'")
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"chain file {path}: seeds must be a list of distinct integers, e.g. [0, 1, 2]")
    shared = _overrides(data.get("overrides"), f"chain file {path}: overrides")
    stages: list[Stage] = []
    for stage_name, spec in data["stages"].items():
        where = f"chain file {path}: stage {stage_name!r}"
        if not NAME_OK.fullmatch(str(stage_name)):
            raise ConfigError(f"{where}: a stage name is letters, digits, '-' or '_'")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("job"), str):
            raise ConfigError(f"{where}: needs `job: jobs/<name>.yaml` (and optional overrides, after)")
        extra = set(spec) - {"job", "overrides", "after"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}; a stage has job, overrides, after")
        overrides = _overrides(spec.get("overrides"), f"{where}: overrides")
        earlier = [s.name for s in stages]
        deps: list[str] = []
        for key, value in overrides:
            for ref in _refs(value):
                m = STAGE_REF.fullmatch(ref)
                if not m:
                    raise ConfigError(f"{where}: {key}: ${{{ref}}} is not a reference dodo knows; write "
                                      "${stages.<earlier stage>.run_dir}")
                if m[1] not in earlier:
                    raise ConfigError(f"{where}: {key} names stage {m[1]!r}, which is not listed before it "
                                      f"(earlier stages: {', '.join(earlier) or 'none'}); list stages in order")
                deps.append(m[1])
        after = spec.get("after") or []
        if not isinstance(after, list) or any(a not in earlier for a in after):
            raise ConfigError(f"{where}: after must list stages named before it ({', '.join(earlier) or 'none'})")
        stages.append(Stage(str(stage_name), _find_job(spec["job"], file), overrides,
                            list(dict.fromkeys(deps + list(after)))))
    return name, [(seed_key, s) for s in seeds], shared, stages


def _overrides(raw: Any, where: str) -> list[tuple[str, Any]]:
    from dodo.config.loader import parse_override

    if raw is None:
        return []
    if isinstance(raw, Mapping):
        return [(str(k), v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return [parse_override(x) for x in raw]
    raise ConfigError(f"{where} must be a mapping (key.path: value) or a list of 'key.path=value'")


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, Mapping):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _resolve(value: Any, dirs: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return REF.sub(lambda m: dirs[STAGE_REF.fullmatch(m[1])[1]], value)  # refs checked by read_chain
    if isinstance(value, list):
        return [_resolve(v, dirs) for v in value]
    if isinstance(value, Mapping):
        return {k: _resolve(v, dirs) for k, v in value.items()}
    return value


def _find_job(job: str, chain_file: Path) -> str:
    if Path(job).is_file() or Path(job).is_absolute():
        return job
    beside = chain_file.parent / job
    return str(beside) if beside.is_file() else job  # a missing job: load_job names it


def _text(key: str, value: Any) -> str:
    import json

    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def instances(stages: list[Stage], seeds: list[Any], folder: Path, name: str, token: str) -> list[Instance]:
    out = []
    for seed in seeds or [None]:
        for stage in stages:
            suffix = f"_s{seed[1]}" if seed is not None else ""
            job_name = f"{name}.{stage.name}" + (f".s{seed[1]}" if seed is not None else "") + f".{token}"
            out.append(Instance(stage.name, seed, stage.name + suffix, [d + suffix for d in stage.deps], job_name))
    return out


def build(chain_file: str, cli_overrides: list[str], profile: str | None, folder: Path, token: str,
          check: Callable[[JobConfig, str, str], None] | None = None):
    """Every instance's config, built with the run directories resolved under ``folder`` and
    checked (``check(cfg, where)``: the submit-time checks); nothing is written."""
    from dodo.config.preflight import missing_paths

    name, seeds, shared, stages = read_chain(chain_file)
    by_name = {s.name: s for s in stages}
    insts = instances(stages, seeds, folder, name, token)
    configs = []
    for inst in insts:
        stage = by_name[inst.stage]
        suffix = inst.dir[len(inst.stage):]
        dirs = {d: str(folder / (d + suffix)) for d in by_name}
        texts = [_text(k, v) for k, v in shared] + [_text(k, _resolve(v, dirs)) for k, v in stage.overrides]
        fixed = [f"name={inst.job_name}"] + ([f"{inst.seed[0]}={inst.seed[1]}"] if inst.seed is not None else [])
        where = f"chain stage {inst.dir} ({stage.job})"
        try:
            cfg = load_job(stage.job, [*texts, *cli_overrides, *fixed], cluster_profile=profile)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        missing = [m for m in missing_paths(cfg) if str(folder) not in m]  # stage dirs exist before they run
        if missing:
            raise ConfigError(f"{where}: {missing[0]}")
        if check is not None:
            check(cfg, where, str(folder))
        configs.append(cfg)
    if len({(c.runs_dir, c.cluster.backend) for c in configs}) > 1:
        raise ConfigError(f"chain {chain_file}: the stages differ in runs_dir or cluster.backend; every stage "
                          "runs in one chain folder on one scheduler: set them in the chain's overrides")
    return name, seeds, insts, configs


@dataclass
class Chain:
    path: Path
    name: str
    instances: list[Instance]

    @property
    def file(self) -> Path:
        return self.path / "chain.json"

    def run(self, inst: Instance) -> RunDir:
        return RunDir(self.path / inst.dir)

    def runs(self) -> list[RunDir]:
        return [self.run(i) for i in self.instances]

    def entries(self) -> list:
        """For `dodo table CHAIN`: one row per stage, seeds grouped."""
        from dodo.cluster.table import Entry

        return [Entry(i.dir, i.stage, i.seed and i.seed[1], self.run(i),
                      {"stage": i.stage, **(dict([i.seed]) if i.seed is not None else {})}) for i in self.instances]

    def title(self) -> str:
        data = read_json(self.file, {})
        stages = list(dict.fromkeys(i.stage for i in self.instances))
        seeds = {tuple(i.seed) for i in self.instances if i.seed is not None}
        return (f"chain {self.path.parent.name}/{self.path.name}: {' -> '.join(stages)}"
                + (f" x {len(seeds)} seed{'s' if len(seeds) > 1 else ''}" if seeds else "")
                + f" ({data.get('backend', 'not submitted')})")

    def note(self, inst: Instance, state_of: Callable[[RunDir], str]) -> str:
        """Why a stage did not run: the stage it waited for failed (named, with its log)."""
        run = self.run(inst)
        said = run.status().get("reason", "") if run.status().get("state") == "blocked" else ""
        if said:
            return said
        if not state_of(run).startswith(("never started", "queued")):
            return ""
        by_dir = {i.dir: i for i in self.instances}
        for dep in inst.deps:
            state = state_of(self.run(by_dir[dep]))
            if state.startswith(("failed", "cancelled", "stopped", "blocked")):
                from dodo.cluster.chain_submit import blocked_reason

                return blocked_reason(self.run(by_dir[dep]), dep, state)
        return ""

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Chain":
        folder = Path(path).resolve()
        data = read_json(folder / "chain.json")
        if data is None:
            raise FileNotFoundError(f"{path} is not a dodo chain (no chain.json); pass a folder printed by "
                                    "`dodo chain`, e.g. runs/<name>/chain_<id>")
        insts = [Instance(**{**i, "seed": tuple(i["seed"]) if i["seed"] is not None else None})
                 for i in data["instances"]]
        return cls(folder, data["name"], insts)


def create(chain_file: str, cli_overrides: list[str], profile: str | None,
           check: Callable[[JobConfig, str, str], None] | None = None) -> tuple[Chain, list[JobConfig]]:
    """Check every stage, then write the chain folder whole (staged, then renamed)."""
    import json

    token = secrets.token_hex(2)
    name = read_chain(chain_file)[0]
    # The folder's path must be known before the configs (they name stage directories in it).
    first = first_config(chain_file, cli_overrides, profile)
    parent = Path(first.runs_dir).resolve() / name
    chain_id = "chain_" + time.strftime("%Y-%m-%d_%H%M%S") + "_" + token
    final = parent / chain_id
    name, seeds, insts, configs = build(chain_file, cli_overrides, profile, final, token, check)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{chain_id}."))
    try:
        (staging / "job").mkdir()
        for inst, cfg in zip(insts, configs):
            made = RunDir.create(staging.parent, staging.name, dump_config(cfg))
            os.rename(made.path, staging / inst.dir)
        shutil.copyfile(chain_file, staging / "chain.yaml")
        write_json_atomic(staging / "chain.json", {
            "name": name, "file": str(chain_file), "overrides": list(cli_overrides), "created": time.time(),
            "seeds": [list(x) for x in seeds], "instances": [json.loads(json.dumps(i.__dict__)) for i in insts]})
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Chain.open(final), configs


def first_config(chain_file: str, cli_overrides: list[str], profile: str | None) -> JobConfig:
    """The first stage's config without references: where the chain folder goes (runs_dir)."""
    _, _, shared, stages = read_chain(chain_file)
    plain = [_text(k, v) for k, v in shared + stages[0].overrides]
    try:
        return load_job(stages[0].job, [*plain, *cli_overrides], cluster_profile=profile)
    except ConfigError as err:
        raise ConfigError(f"chain stage {stages[0].name} ({stages[0].job}): {err}") from None


def remove(chain: Chain) -> None:
    shutil.rmtree(chain.path, ignore_errors=True)
