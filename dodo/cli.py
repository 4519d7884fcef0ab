"""dodo's command line: submit | run | status | logs | cancel.

Expected failures (bad job, bad run directory, refused submission) print one `dodo: error:`
line and exit 2 (1 for a run that failed); only real bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from dodo.config.errors import ConfigError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dodo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a job file (or resume a run directory)")
    s.add_argument("job", help="jobs/<name>.yaml, or an existing run directory to resume")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=50")
    s.add_argument("--cluster", choices=["auto", "local", "slurm", "lsf"], default=None,
                   help="scheduler backend (default: cluster.backend of the job, auto-detected)")
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and launch plan only")
    s.add_argument("--detach", action="store_true", help="local backend: return instead of streaming")

    r = sub.add_parser("run", help="per-rank entry point inside an allocation")
    r.add_argument("run_dir")

    st = sub.add_parser("status", help="state of runs (all under ./runs, or one)")
    st.add_argument("run", nargs="?", help="a run directory (default: every run under runs/)")
    st.add_argument("--runs-dir", default="runs")

    lg = sub.add_parser("logs", help="print a rank's log")
    lg.add_argument("run")
    lg.add_argument("--rank", type=int, default=0)
    lg.add_argument("-f", "--follow", action="store_true")

    c = sub.add_parser("cancel", help="stop a run for good")
    c.add_argument("run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"submit": cmd_submit, "run": cmd_run, "status": cmd_status, "logs": cmd_logs,
                "cancel": cmd_cancel}[args.command](args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"dodo: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_submit(args: argparse.Namespace) -> int:
    from dodo.cluster.backend import BackendError, detect_backend, get_backend
    from dodo.config.loader import dump_config, load_job
    from dodo.config.preflight import missing_paths
    from dodo.rundir import RunDir

    resume = Path(args.job).is_dir()
    if resume:
        if args.overrides:
            raise ConfigError(f"{args.job} is a run directory: its config is fixed; overrides "
                              f"{' '.join(args.overrides)} apply only to a job file")
        run = RunDir.open(args.job)
        cfg = load_job(run.config)
    else:
        cfg = load_job(args.job, args.overrides)
    backend_name = args.cluster or cfg.cluster.backend
    if backend_name == "auto":
        backend_name = detect_backend()
    try:
        backend = get_backend(backend_name)
    except BackendError as err:
        if args.cluster is None and cfg.cluster.backend == "auto":
            print(f"dodo: {err}; running locally", file=sys.stderr)
            backend = get_backend("local")
        else:
            raise ConfigError(str(err)) from None
    missing = missing_paths(cfg)
    if args.dry_run:
        return _print_dry_run(cfg, backend, dump_config(cfg), missing)
    if missing:
        raise ConfigError(f"{args.job}: {missing[0]}")
    if not resume:
        run = RunDir.create(cfg.runs_dir, cfg.name, dump_config(cfg))
    try:
        record, code = backend.submit(run, cfg, foreground=not args.detach)
    except BackendError as err:
        if not resume:
            run.remove()
        raise ConfigError(str(err)) from None
    if args.detach:
        print(f"dodo: submitted {record.backend} job {record.job_id}\n  run directory {run.path}\n"
              f"  follow it with: dodo logs {run.path} -f")
    return code


def _print_dry_run(cfg, backend, config_text: str, missing: list[str]) -> int:
    from dodo.distributed.engine import deepspeed_config

    run_path = f"{cfg.runs_dir}/{cfg.name}/<id>"
    print("# resolved config (a valid job file)\n" + config_text)
    print(f"# launch plan ({backend.name} backend)\n{backend.launch_plan(cfg, run_path)}\n")
    print("# DeepSpeed config per rank (precision resolved per device at run time; CPU shown)")
    print(json.dumps(deepspeed_config(cfg, cfg.cluster.world_size, "fp32"), indent=2))
    for problem in missing:
        print(f"\n# warning: {problem}")
    print("\n# dry run: nothing was submitted or written")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from dodo.cluster.env import DistEnvError
    from dodo.train.checkpoint import CheckpointError
    from dodo.train.entry import run_rank

    try:
        return run_rank(args.run_dir)
    except (DistEnvError, CheckpointError) as err:
        raise ConfigError(str(err)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from dodo.status import print_status

    return print_status(args.run, args.runs_dir)


def cmd_logs(args: argparse.Namespace) -> int:
    from dodo.rundir import RunDir

    run = RunDir.open(args.run)
    path = run.rank_log(args.rank)
    if not path.exists():
        ranks = sorted(p.stem.split("_")[1] for p in run.logs.glob("rank_*.log"))
        raise FileNotFoundError(f"no log for rank {args.rank} in {run.logs}; ranks with logs: "
                                f"{', '.join(ranks) or 'none yet'}")
    from dodo.status import run_is_active

    with open(path, "rb") as f:
        while True:
            data = f.read()
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            if not args.follow or not run_is_active(run):
                return 0
            time.sleep(0.5)


def cmd_cancel(args: argparse.Namespace) -> int:
    from dodo.cluster.backend import JobRecord, get_backend
    from dodo.rundir import RunDir

    run = RunDir.open(args.run)
    record = JobRecord.load(run)
    if record is None:
        raise FileNotFoundError(f"{run.path} was never submitted (no job/backend.json); nothing to cancel")
    get_backend(record.backend).cancel(record)
    run.update_status(state="cancelled")
    print(f"dodo: cancelled {record.backend} job {record.job_id} ({run.path})")
    return 0
