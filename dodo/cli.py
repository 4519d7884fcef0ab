"""dodo's command line: submit | run | status | logs | cancel | sweep | table | data | eval | export | generate | upcycle.

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
from dodo.exitcodes import EXIT_COMPLETED, EXIT_INTERRUPTED, EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dodo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("submit", help="submit a job file (or resume a run directory)")
    s.add_argument("job", help="jobs/<name>.yaml, or an existing run directory to resume")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=50")
    s.add_argument("--cluster", default=None, metavar="PROFILE",
                   help="cluster profile from hpc/clusters/ (local, slurm, summit, ...; it beats the "
                        "job's cluster keys), or auto (default: the job's cluster section)")
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

    sw = sub.add_parser("sweep", help="submit a grid and/or listed points of overrides as one job array")
    sw.add_argument("job", help="jobs/<name>.yaml")
    sw.add_argument("overrides", nargs="*", help="key.path=value overrides shared by every point")
    sw.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                    help="e.g. --grid train.lr=1e-4,3e-4 data.seed=0,1 (the product of all; with listed "
                         "points, every point at every grid combination)")
    sw.add_argument("--point", action="append", default=[], metavar="'[LABEL:] K=V ...'",
                    help="a listed point (repeatable), e.g. --point \"lora: model.adapter.kind=lora train.lr=1e-3\"")
    sw.add_argument("--points", default=None, metavar="FILE",
                    help="a YAML list of override mappings, each with an optional `name:` label")
    sw.add_argument("--cluster", default=None, metavar="PROFILE", help="as for submit")
    sw.add_argument("--dry-run", action="store_true", help="print the points and the script only")

    ch = sub.add_parser("chain", help="submit stages that take earlier stages' run directories as inputs")
    ch.add_argument("chain", help="a chain file (docs/clusters.md: stage chains)")
    ch.add_argument("overrides", nargs="*", help="key.path=value overrides for every stage")
    ch.add_argument("--cluster", default=None, metavar="PROFILE", help="as for submit")
    ch.add_argument("--dry-run", action="store_true", help="check every stage and print the plan only")

    tb = sub.add_parser("table", help="a sweep's (or chain's) final metrics as markdown (and csv)")
    tb.add_argument("sweep", help="runs/<name>/sweep_<id> or runs/<name>/chain_<id>")
    tb.add_argument("--layout", default="points", choices=["points", "methods", "retrieval", "idood"],
                    help="points: a row per point; methods: a row per method, mean ± std over seeds (data.seed, model.init_seed, train.seed); "
                         "retrieval: T->I / I->T R@1/5/10; idood: one metric on ID / OOD datasets + OOD mean")
    tb.add_argument("--metric", default="", help="idood: the metric (top1, r_mean, ...; default: top1, r_mean)")
    tb.add_argument("--metrics", nargs="+", default=[], metavar="GLOB",
                    help="methods: only these metric keys, e.g. 'eval.zeroshot.*.top1'")
    tb.add_argument("--dataset", default="", help="retrieval: one dataset; idood: one suite kind")
    tb.add_argument("--rescored", action="store_true",
                    help="the suite metrics of `dodo eval RUN --task suites` (RUN/eval/suites.json) in place "
                         "of those recorded at the end of training, where a run has them")

    _data_parser(sub)

    ev = sub.add_parser("eval", help="evaluate a trained run (retrieval, zero-shot, kNN, WiSE curve)")
    ev.add_argument("run", help="a run directory with a checkpoint")
    ev.add_argument("--task", default=None, choices=["retrieval", "zeroshot", "knn", "wise", "weightwatcher", "suites",
                                                     "predict", "all"],
                    help="default: all (retrieval, zeroshot, knn, wise); suites: the job's eval.suites again "
                         "(read by dodo table --rescored); predict: VLMo vqa / nlvr2 answers for "
                         "model.vlmo.predict_cache (the evaluation servers' formats)")
    ev.add_argument("--wise", action="store_true", help="the WiSE-FT curve against the stored pretrained weights")
    ev.add_argument("--weightwatcher", action="store_true", help="WeightWatcher's per-layer alpha (mean + layers)")

    ex = sub.add_parser("export", help="write a run's adapters in PEFT's format, or merged into HF weights")
    ex.add_argument("run", help="a run directory with a checkpoint")
    ex.add_argument("--format", required=True, choices=["peft", "merged"], dest="fmt")
    ex.add_argument("--out", required=True, help="a new directory (docs/models.md: dodo export)")

    from dodo.generate_run import add_parser as generate_parser  # torch-free; the command imports late
    generate_parser(sub)

    up = sub.add_parser("upcycle", help="start a new MoE run from a trained dense-adapter run (sparse upcycling)")
    up.add_argument("run", help="the dense run directory (its latest checkpoint is used)")
    up.add_argument("--experts", type=int, required=True, help="experts per MoE adapter (model.moe.num_experts)")
    up.add_argument("--top-k", type=int, default=None, help="model.moe.top_k (default: the config's, 2)")
    up.add_argument("--noise", type=float, default=0.0,
                    help="expert = dense + noise * std(weight) * N(0, 1) (model.moe.upcycle_noise)")
    up.add_argument("overrides", nargs="*", help="key.path=value overrides for the new run, e.g. model.moe.ep_size=2")

    return p


def _data_parser(sub) -> None:
    """`dodo data cache | verify`: build and check HDF5 / zarr shard caches (docs/data.md)."""
    d = sub.add_parser("data", help="build or check a data cache (HDF5 / zarr shards)")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("cache", help="cache an image-caption source as shards + manifest (resumable)")
    dc.add_argument("src", help="tars (file, folder or glob) | COCO captions JSON | Karpathy split JSON | "
                                "CC3M TSV | class-folder tree or captions/labels CSV/TSV/JSONL | CIFAR "
                                "folder | SVHN .mat | text file/folder | parallel-text JSONL (src/tgt) | VQA v2 questions JSON | "
                                "NLVR2 .json (JSON lines) | synthetic split (train/eval)")
    dc.add_argument("--from", dest="source", required=True,
                    choices=["webdataset", "coco", "karpathy", "cc3m", "folder", "cifar", "svhn", "text", "parallel",
                             "vqa", "nlvr2", "synthetic"])
    dc.add_argument("--out", required=True, help="cache folder to write (or finish)")
    dc.add_argument("--store", choices=["hdf5", "zarr"], default="hdf5")
    dc.add_argument("--encode", choices=["jpeg", "raw"], default="jpeg",
                    help="jpeg: re-encoded bytes (small); raw: uint8 arrays (fast, large)")
    dc.add_argument("--image-size", type=int, default=256, help="square side in px; 0 keeps the size (jpeg)")
    dc.add_argument("--resize", choices=["center-crop", "pad", "stretch"], default="center-crop")
    dc.add_argument("--samples-per-shard", type=int, default=5000)
    dc.add_argument("--workers", type=int, default=1, help="worker processes")
    dc.add_argument("--images", help="image folder (coco, cc3m, folder); see docs/data.md for defaults")
    dc.add_argument("--num", type=int, default=0, help="synthetic: number of samples")
    dc.add_argument("--seed", type=int, default=1234, help="synthetic: generator seed")
    dc.add_argument("--tokenizer", default="", help="also store captions pre-tokenised with this tokenizer")
    dc.add_argument("--split", default="", help="karpathy: train|restval|val|test or a comma list; cifar: "
                                                "train|test; svhn: train|test|extra; others: recorded in the manifest")
    dc.add_argument("--classnames", default="", help="class-names file (folder, cifar, labelled sources): "
                                                     "one per line, 'wnid name' lines or JSON")
    dc.add_argument("--block", type=int, default=0, help="text: token blocks of N tokens (needs --tokenizer); "
                                                         "0 = one sample per line")
    dc.add_argument("--dataset", default="", help="dataset name for the manifest when the source cannot "
                                                  "tell (e.g. imagenet1k, imagenet_r)")
    dc.add_argument("--min-count", type=int, default=0, help="vqa: answers given fewer times are left out of "
                                                             "the answer vocabulary (0 = the standard 9)")
    dv = dsub.add_parser("verify", help="check every shard of a cache against its manifest checksums")
    dv.add_argument("cache")


MAX_MESSAGE = 600  # characters of one error line, however large the input that caused it


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, with key=value overrides accepted before or after the flags: argparse stops
    filling the `overrides` positional at the first flag, so what follows comes back unparsed."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {_cut(' '.join(stray), 200)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def expected_error(err: BaseException) -> bool:
    """Errors that are the user's to fix (bad input, a damaged cache, a refused resume): one line.

    Classes of heavy modules are looked up only where that module was imported, so that this
    stays torch-free; anything else is a bug and keeps its traceback.
    """
    if isinstance(err, (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    for module, name in (("dodo.data.manifest", "CacheError"), ("dodo.data.ingest", "SourceError"),
                         ("dodo.train.checkpoint", "CheckpointError"), ("dodo.cluster.env", "DistEnvError"),
                         ("dodo.cluster.backend", "BackendError")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def _cut(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())  # one line: a message quoting a multi-line output stays one
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return {"submit": cmd_submit, "run": cmd_run, "status": cmd_status, "logs": cmd_logs,
                "cancel": cmd_cancel, "data": cmd_data, "eval": cmd_eval, "export": cmd_export,
                "sweep": cmd_sweep, "table": cmd_table, "upcycle": cmd_upcycle,
                "generate": cmd_generate, "chain": cmd_chain}[args.command](args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `dodo submit --dry-run | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_COMPLETED
    except Exception as err:  # noqa: BLE001 - sorted into expected (one line) and bugs (traceback)
        if not expected_error(err):
            raise
        print(f"dodo: error: {_cut(str(err))}", file=sys.stderr)
        return EXIT_USAGE


def cmd_upcycle(args: argparse.Namespace) -> int:
    from dodo.train.init_from import create_upcycled_run

    if args.experts < 1:
        raise ConfigError(f"--experts must be >= 1, got {args.experts}")
    try:
        path = create_upcycled_run(args.run, args.experts, args.top_k, args.noise, args.overrides)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"dodo: upcycled {args.run} into {args.experts} experts per MoE adapter\n  new run directory {path}\n"
          f"  start it with: dodo submit {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from dodo.cluster.backend import BackendError, detect_backend, get_backend
    from dodo.config.loader import dump_config, load_job
    from dodo.config.preflight import missing_paths
    from dodo.rundir import RunDir

    resume = Path(args.job).is_dir()
    changes: list[str] = []
    overrides_record: Path | None = None
    if resume:
        run = RunDir.open(args.job)
        cfg, changes = _resume_config(args.job, run, args.overrides)
        if args.cluster not in (None, "auto", cfg.cluster.profile):
            raise ConfigError(f"{args.job} is a run directory of cluster profile "
                              f"{cfg.cluster.profile or cfg.cluster.backend!r}; its config is fixed, so "
                              f"--cluster {args.cluster} cannot apply; leave --cluster out")
    else:
        profile = args.cluster if args.cluster not in (None, "auto") else None
        cfg = load_job(args.job, args.overrides, cluster_profile=profile)
    backend_name = cfg.cluster.backend
    if backend_name == "auto":
        backend_name = detect_backend()
    try:
        backend = get_backend(backend_name)
    except BackendError as err:
        if cfg.cluster.backend == "auto":
            print(f"dodo: {err}; running locally", file=sys.stderr)
            backend = get_backend("local")
        else:
            raise ConfigError(str(err)) from None
    missing = missing_paths(cfg)
    if args.dry_run:
        return _print_dry_run(cfg, backend, dump_config(cfg), missing)
    if missing:
        raise ConfigError(f"{args.job}: {missing[0]}")
    _check_caches(cfg)
    _check_suites(cfg)
    try:
        backend.preflight(cfg)  # e.g. sbatch missing: refuse before writing anything
    except BackendError as err:
        raise ConfigError(str(err)) from None
    if not resume:
        run = RunDir.create(cfg.runs_dir, cfg.name, dump_config(cfg))
    else:
        from dodo.config.resume import record_overrides

        (run.job / "cancelled").unlink(missing_ok=True)  # resuming a cancelled run: go on
        # Kept apart from config.yaml until the ranks have accepted them (dodo/config/resume.py).
        overrides_record = record_overrides(run, args.overrides, changes)
        if overrides_record is not None:
            print(f"dodo: overrides for this resume recorded in {overrides_record} "
                  f"({', '.join(changes) or 'no change'}); "
                  "config.yaml takes them once the ranks have loaded the checkpoint", flush=True)
    from dodo.train.provenance import snapshot_code

    snapshot_code(run)  # job/code/: every allocation of the run runs this copy (dodo/train/provenance.py)
    try:
        record, code = backend.submit(run, cfg, foreground=not args.detach)
    except BackendError as err:
        if not resume:
            run.remove()
            _remove_empty(run.path.parent, run.path.parent.parent)
        elif overrides_record is not None:  # never submitted: this resume leaves no trace
            overrides_record.unlink(missing_ok=True)
        raise ConfigError(str(err)) from None
    if args.detach or record.backend != "local":
        print(f"dodo: submitted {record.backend} job {record.job_id}\n  run directory {run.path}\n"
              f"  follow it with: dodo logs {run.path} -f")
    return code


def _resume_config(run_dir: str, run, overrides: Sequence[str]):
    """The config a resume would run, and what changes; every check that can refuse the resume
    runs here, before anything is written (dodo/config/resume.py). Returns (config, changes)."""
    from dodo.config.loader import config_to_dict, load_job
    from dodo.config.resume import check_resume, check_resume_keys
    from dodo.train.checkpoint_index import latest

    check_resume_keys(run_dir, overrides)  # before parsing them: the message names the rule
    old = load_job(run.config)
    new = load_job(run.config, overrides) if overrides else old
    ckpt = latest(run)
    check_resume(run_dir, old, new, overrides, ckpt.world_size if ckpt else None)

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    before = dict(flat(config_to_dict(old)))
    changes = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in flat(config_to_dict(new)) if before.get(k) != v]
    return new, changes


def _check_caches(cfg) -> None:
    """A missing or damaged data cache is refused here, not as a rank's traceback later.

    Checked at the run's own data.verify level: "checksum" (the default) hashes every shard, as
    the ranks will; "size" only compares sizes and does NOT notice flipped bytes (for multi-TB
    caches, after one `dodo data verify`); "none" skips it.
    """
    d = cfg.data
    if d.kind == "synthetic":
        return
    from dodo.data.manifest import CacheError, Manifest

    for key in ("train_cache", "eval_cache"):
        path = getattr(d, key)
        if not path or (d.synthetic_on_first_use and not Path(path).exists()):
            continue  # "" = held out of train_cache; synthetic_on_first_use builds it in the run
        try:
            root = Path(path).expanduser()
            Manifest.load(root).verify(root, d.verify)
        except CacheError as err:
            raise ConfigError(f"data.{key}={path!r}: {err}") from None


def _check_suites(cfg) -> None:
    """Refuse, before anything is written, an eval suite the run's data cannot feed."""
    from dodo.eval.suites import check_suites
    from dodo.models.registry import family

    spec = family(cfg.model.family)
    check_suites(cfg, spec.suites_of(cfg), spec.eval_hooks)


def _remove_empty(*folders: Path) -> None:
    """Folders a failed submission created on the way: leave nothing behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _print_dry_run(cfg, backend, config_text: str, missing: list[str]) -> int:
    from dodo.distributed.config import deepspeed_config

    run_path = f"{cfg.runs_dir}/{cfg.name}/<id>"
    print("# resolved config (a valid job file)\n" + config_text)
    print(f"# launch plan ({backend.name} backend)\n{backend.launch_plan(cfg, run_path)}\n")
    print("# DeepSpeed config per rank (precision resolved per device at run time; CPU shown)")
    print(json.dumps(deepspeed_config(cfg, cfg.cluster.world_size, "fp32"), indent=2))
    plan = getattr(cfg.model.moe, "plan", None)  # model.moe.ep_size: auto (dodo/moe/planner.py)
    if plan is not None:
        print("\n# expert placement (estimates per GPU per step, docs/scaling.md)\n" + "\n".join(plan.lines()))
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
        raise FileNotFoundError(f"{run.path} was never submitted (no readable job/backend.json); nothing to cancel")
    # Marked first: a rank that checkpoints on the scheduler's TERM must not requeue the run.
    (run.job / "cancelled").write_text(f"{time.time()}\n")
    get_backend(record.backend).cancel(record)
    run.update_status(state="cancelled")
    print(f"dodo: cancelled {record.backend} job {record.job_id} ({run.path})")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from dodo.data.cache import CacheOptions, build_cache
    from dodo.data.ingest import SourceError
    from dodo.data.manifest import CacheError, Manifest

    try:
        if args.data_command == "verify":
            manifest = Manifest.load(Path(args.cache))
            manifest.verify(Path(args.cache), "checksum")
            print(f"dodo: {args.cache}: {len(manifest.shards)} shards, {manifest.num_samples} samples: "
                  "all checksums match")
            return 0
        opts = CacheOptions(source=args.source, src=args.src, out=args.out, store=args.store,
                            encode=args.encode, image_size=args.image_size, resize=args.resize,
                            samples_per_shard=args.samples_per_shard, workers=args.workers,
                            images=args.images, num=args.num, seed=args.seed, tokenizer=args.tokenizer,
                            split=args.split, classnames=args.classnames, block=args.block,
                            dataset=args.dataset, min_count=args.min_count)
        build_cache(opts)
        return 0
    except (SourceError, CacheError) as err:
        print(f"dodo: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def cmd_eval(args: argparse.Namespace) -> int:
    from dodo.eval.run import eval_run

    tasks = [t for t, on in (("wise", args.wise), ("weightwatcher", args.weightwatcher)) if on]
    return eval_run(args.run, ([args.task] if args.task else []) + tasks or ["all"])


def cmd_generate(args: argparse.Namespace) -> int:
    from dodo.generate_run import cmd_generate as run_generate

    return run_generate(args)


def cmd_export(args: argparse.Namespace) -> int:
    from dodo.export import export_run

    export_run(args.run, args.fmt, args.out)
    return 0


def _check_stage(cfg, where: str, made_here: str = "") -> None:
    """The submit-time checks of one sweep point or chain stage (paths, caches, suites). Paths
    under ``made_here`` (a chain's folder: earlier stages' run directories) count as present."""
    from dodo.config.preflight import missing_paths

    try:
        missing = [m for m in missing_paths(cfg) if not made_here or made_here not in m]
        if missing:
            raise ConfigError(missing[0])
        _check_caches(cfg)
        _check_suites(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from dodo.cluster import sweep as sweeps
    from dodo.cluster.backend import BackendError, detect_backend, get_backend

    profile = args.cluster if args.cluster not in (None, "auto") else None
    _, _, points = sweeps.plan(args.grid, args.point, args.points)
    configs = sweeps.build_configs(args.job, args.overrides, points, profile)  # all, before anything is written
    first = configs[0]
    name = detect_backend() if first.cluster.backend == "auto" else first.cluster.backend
    try:
        backend = get_backend(name)
        if args.dry_run:
            print(f"# {len(points)} points\n" + "\n".join(f"  {p.label}" for p in points))
            print(f"# launch plan of point {points[0].dir} ({backend.name} backend; one array for all)\n"
                  + backend.launch_plan(first, f"{first.runs_dir}/{first.name}/sweep_<id>/{points[0].dir}"))
            print("\n# dry run: nothing was submitted or written")
            return 0
        backend.preflight(first)
    except BackendError as err:
        raise ConfigError(str(err)) from None
    for point, cfg in zip(points, configs):
        _check_stage(cfg, f"sweep point {point.label}")
    sweep, configs = sweeps.create(args.job, args.overrides, args.grid, profile, args.point, args.points, configs)
    runs = sweep.runs()
    if backend.name == "local":  # no scheduler: the points one after another, in the foreground
        sweeps.record_submission(sweep, "local", "-")
        codes = [backend.submit(run, cfg, foreground=True)[1] for run, cfg in zip(runs, configs)]
        print(sweeps.write_table(sweep))
        return max(codes)
    try:
        records = backend.submit_array(runs, configs[0], sweep.job)
    except BackendError as err:
        sweeps.remove(sweep)
        _remove_empty(sweep.path.parent, sweep.path.parent.parent)
        raise ConfigError(str(err)) from None
    job_id = records[0].details.get("array_job", records[0].job_id)
    sweeps.record_submission(sweep, backend.name, job_id)
    print(f"dodo: submitted {backend.name} job array {job_id} with {len(runs)} points\n"
          f"  sweep {sweep.path}\n  watch it with: dodo status {sweep.path}\n"
          f"  collate it with: dodo table {sweep.path}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from dodo.cluster.chain import Chain
    from dodo.cluster.sweep import Sweep
    from dodo.cluster.table import write_table
    from dodo.status import effective_state

    folder = Chain.open(args.sweep) if (Path(args.sweep) / "chain.json").is_file() else Sweep.open(args.sweep)
    options = {} if args.layout == "points" else {"metric": args.metric, "metrics": args.metrics,
                                                 "dataset": args.dataset}
    print(write_table(folder, args.layout, effective_state, rescored=args.rescored, **options), end="")
    stem = "table" if args.layout == "points" else f"table_{args.layout}"
    print(f"(also written to {folder.path}/{stem}.md and {stem}.csv)")
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from dodo.cluster import chain as chains
    from dodo.cluster import chain_submit as submit
    from dodo.cluster.backend import BackendError, detect_backend, get_backend

    profile = args.cluster if args.cluster not in (None, "auto") else None
    first = chains.first_config(args.chain, args.overrides, profile)
    try:
        backend = get_backend(detect_backend() if first.cluster.backend == "auto" else first.cluster.backend)
        if not args.dry_run:
            backend.preflight(first)  # e.g. sbatch missing: refuse before anything is written
    except BackendError as err:
        raise ConfigError(str(err)) from None
    if args.dry_run:
        folder = Path(first.runs_dir).resolve() / "<name>" / "chain_<id>"
        _, _, insts, _ = chains.build(args.chain, args.overrides, profile, folder, "xxxx", _check_stage)
        print("\n".join(f"  stage {i.dir} (job {i.job_name})" + (f", after {', '.join(i.deps)}" if i.deps else "")
                        for i in insts))
        print(f"# {len(insts)} stage runs checked ({backend.name} backend)\n# dry run: nothing was submitted "
              "or written")
        return 0
    chain, configs = chains.create(args.chain, args.overrides, profile, _check_stage)
    from dodo.train.provenance import snapshot_code

    for run in chain.runs():  # job/code/: a stage that waits in the queue runs the code of this submit
        snapshot_code(run)
    if backend.name == "local":
        code, problems = submit.run_local(chain, configs, backend)
        for line in problems:
            print(f"dodo: chain {chain.name}: {line}", file=sys.stderr)
        print(f"dodo: chain {chain.path}: {len(chain.instances) - len(problems)} of {len(chain.instances)} "
              f"stage runs completed\n  collate it with: dodo table {chain.path} --layout methods")
        return code
    try:
        ids = submit.submit_batch(chain, configs, backend)
    except BackendError as err:
        chains.remove(chain)
        _remove_empty(chain.path.parent, chain.path.parent.parent)
        raise ConfigError(str(err)) from None
    print(f"dodo: submitted chain {chain.name} as {backend.name} jobs {', '.join(ids)} (each stage waits "
          f"for its inputs)\n  chain {chain.path}\n  watch it with: dodo status {chain.path}")
    return 0
