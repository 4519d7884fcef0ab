"""Who am I in the job? Rank discovery for torchrun, Slurm (srun), LSF (jsrun) and Open MPI.

`discover()` reads the launcher's variables once, at start-up, and returns a frozen `DistEnv`;
`DistEnv.export()` writes the variables that torch.distributed's env:// and DeepSpeed read.
The first launcher whose variables are present wins: torchrun/DeepSpeed, srun, jsrun, mpirun,
else a single process. Bad values raise `DistEnvError` (a ValueError) naming the variable or
file and the fix, because a wrong rank found here becomes a hang minutes later.
"""

from __future__ import annotations

import os
import re
import socket
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_PORT = 29500  # torchrun's default, used when there is no job id to derive one from
LOOPBACK = "127.0.0.1"


class DistEnvError(ValueError):
    """A launcher variable or file dodo cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int
    source: str  # "torchrun", "slurm", "jsrun", "openmpi" or "single"
    job_id: str | None

    def export(self) -> None:
        """Set what torch.distributed (init_method="env://") and DeepSpeed read."""
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


class _Source(NamedTuple):
    """A launcher: its DistEnv.source name, its variables, and the fix when they are bad."""

    name: str
    rank: str
    local_rank: str
    size: str
    local_size: str
    fix: str


_TORCHRUN = _Source("torchrun", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                    "it is set by torchrun or the DeepSpeed launcher; unset RANK and WORLD_SIZE "
                    "to let dodo read the scheduler's variables instead")
_SLURM = _Source("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE",
                 "it is set by srun; start the step with srun, or unset SLURM_PROCID to run "
                 "outside a Slurm step")
_JSRUN = _Source("jsrun", "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE",
                 "JSM_NAMESPACE_LOCAL_SIZE",
                 "it is set by jsrun; start the job with jsrun, or unset the JSM_NAMESPACE_* "
                 "variables")
_OPENMPI = _Source("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                   "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                   "it is set by mpirun; start the job with mpirun, or unset the "
                   "OMPI_COMM_WORLD_* variables")
_SINGLE = _Source("single", "", "", "", "", "")


def discover(environ: Mapping[str, str] | None = None, use_mpi: bool = True) -> DistEnv:
    """Rank, world and rendezvous address of this process, from `environ` (default os.environ).

    use_mpi: when jsrun/mpirun give no host list and MASTER_ADDR is unset, broadcast rank 0's
    address with mpi4py (imported only then; importing it initialises MPI).
    """
    env = os.environ if environ is None else environ
    for reader in (_from_torchrun, _from_slurm, _from_jsrun, _from_openmpi):
        found = reader(env, use_mpi)
        if found is not None:
            return found
    return _finish(env, _SINGLE, 0, 0, 1, 1, 0, _scheduler_job_id(env), None, use_mpi)


def _from_torchrun(env: Mapping[str, str], use_mpi: bool) -> DistEnv | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    s = _TORCHRUN
    rank, world = _int(env, s.rank, s), _int(env, s.size, s)
    # torchrun sets LOCAL_WORLD_SIZE and GROUP_RANK; DeepSpeed's launcher sets LOCAL_SIZE and
    # CROSS_RANK instead. With neither, assume one node.
    local_var = _first_set(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"))
    s = s._replace(local_size=local_var or s.local_size)  # errors name the variable read
    local_world = world if local_var is None else _int(env, local_var, s)
    local_rank = _int(env, s.local_rank, s, rank % max(local_world, 1))
    node_rank = _first_int(env, ("GROUP_RANK", "CROSS_RANK"), s, rank // max(local_world, 1))
    return _finish(env, s, rank, local_rank, world, local_world, node_rank,
                   _scheduler_job_id(env), None, use_mpi)


def _from_slurm(env: Mapping[str, str], use_mpi: bool) -> DistEnv | None:
    # An salloc shell has SLURM_JOB_ID but no SLURM_PROCID: it was not started by srun.
    if "SLURM_PROCID" not in env:
        return None
    # mpirun inside an allocation starts its daemons with srun, so its ranks inherit the
    # daemon's SLURM_PROCID (a node index). When Open MPI disagrees, Open MPI is right.
    if "OMPI_COMM_WORLD_RANK" in env and (
        env["OMPI_COMM_WORLD_RANK"].strip() != env["SLURM_PROCID"].strip()
        or env.get("OMPI_COMM_WORLD_SIZE", "").strip() != env.get("SLURM_NTASKS", "").strip()
    ):
        return None
    s = _SLURM
    rank, world = _int(env, s.rank, s), _int(env, s.size, s)
    local_rank = _int(env, s.local_rank, s)
    node_rank = _int(env, "SLURM_NODEID", s, 0)
    local_world = world
    # The step's own layout first: SLURM_NTASKS_PER_NODE may be inherited from sbatch options.
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(var):
            per_node = _parse_tasks_per_node(env[var], var)
            s = s._replace(local_size=var)  # errors name the variable read
            if len(per_node) == 1:
                local_world = per_node[0]
            elif node_rank < len(per_node):
                local_world = per_node[node_rank]
            else:
                raise DistEnvError(f"{var}={env[var]!r} lists {len(per_node)} nodes but "
                                   f"SLURM_NODEID={node_rank}; {s.fix}")
            break
    # The step's node list first: a step may run on a subset of the job's nodes.
    nodelist_var = _first_set(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
    hosts: list[str] = []
    if nodelist_var and not env.get("MASTER_ADDR"):
        try:
            hosts = expand_hostlist(env[nodelist_var])
        except ValueError as exc:
            raise DistEnvError(f"{nodelist_var}: {exc}; export MASTER_ADDR=<first host of the "
                               f"step> to bypass it") from None
    return _finish(env, s, rank, local_rank, world, local_world, node_rank, _slurm_job_id(env),
                   hosts[0] if hosts else None, use_mpi)


def _from_jsrun(env: Mapping[str, str], use_mpi: bool) -> DistEnv | None:
    if "JSM_NAMESPACE_RANK" not in env:
        return None
    s = _JSRUN
    rank, world = _int(env, s.rank, s), _int(env, s.size, s)
    local_rank, local_world = _int(env, s.local_rank, s), _int(env, s.local_size, s)
    master = None
    # Read the rankfile only when needed: on a big job every rank reads it from GPFS.
    if not env.get("MASTER_ADDR") and env.get("LSB_DJOB_RANKFILE"):
        master = _rankfile_master(env["LSB_DJOB_RANKFILE"])
    return _finish(env, s, rank, local_rank, world, local_world, rank // max(local_world, 1),
                   _lsf_job_id(env), master, use_mpi)


def _from_openmpi(env: Mapping[str, str], use_mpi: bool) -> DistEnv | None:
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    s = _OPENMPI
    rank, world = _int(env, s.rank, s), _int(env, s.size, s)
    # Spectrum MPI documents only RANK, LOCAL_RANK and SIZE; without LOCAL_SIZE assume one node.
    local_world = _int(env, s.local_size, s, world)
    local_rank = _int(env, s.local_rank, s, rank % max(local_world, 1))
    # Not OMPI_COMM_WORLD_NODE_RANK: despite its name it is a rank *within* the node, counted
    # across all jobs there (Open MPI docs). Open MPI's default mapping fills nodes in order.
    return _finish(env, s, rank, local_rank, world, local_world, rank // max(local_world, 1),
                   _scheduler_job_id(env), None, use_mpi)


def _finish(env: Mapping[str, str], s: _Source, rank: int, local_rank: int, world: int,
            local_world: int, node_rank: int, job_id: str | None, listed_master: str | None,
            use_mpi: bool) -> DistEnv:
    """Check the numbers against each other, then settle the rendezvous address and port."""
    if world < 1:
        raise DistEnvError(f"{s.size}={world} must be at least 1; {s.fix}")
    if not 0 <= rank < world:
        raise DistEnvError(f"{s.rank}={rank} is not in [0, {s.size}={world}); {s.fix}")
    if not 1 <= local_world <= world:
        raise DistEnvError(f"{s.local_size}={local_world} is not in [1, {s.size}={world}]; {s.fix}")
    if not 0 <= local_rank < local_world:
        raise DistEnvError(f"{s.local_rank}={local_rank} is not in [0, {s.local_size}="
                           f"{local_world}); {s.fix}")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world,
                   local_world_size=local_world,
                   master_addr=_master_addr(env, s, listed_master, world, local_world, use_mpi),
                   master_port=_master_port(env, job_id), node_rank=node_rank, source=s.name,
                   job_id=job_id)


def _master_addr(env: Mapping[str, str], s: _Source, listed: str | None, world: int,
                 local_world: int, use_mpi: bool) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if listed:
        return listed
    if world == 1:
        return LOOPBACK
    if use_mpi and s.name in ("jsrun", "openmpi"):
        return _broadcast_rank0_address(s, world)
    if local_world == world:  # every rank is on this node
        return LOOPBACK
    or_mpi = ", or call discover(use_mpi=True)" if s.name in ("jsrun", "openmpi") else ""
    raise DistEnvError(f"cannot tell which host runs rank 0: {s.name} gave no host list and "
                       f"MASTER_ADDR is unset; export MASTER_ADDR=<host of rank 0>{or_mpi}")


def _broadcast_rank0_address(s: _Source, world: int) -> str:
    try:
        from mpi4py import MPI  # lazy: importing it runs MPI_Init
    except ImportError as exc:
        raise DistEnvError(f"{s.name} gave no host list, MASTER_ADDR is unset and mpi4py cannot be "
                           f"imported ({exc}); install mpi4py or export MASTER_ADDR") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world:
        raise DistEnvError(f"mpi4py sees {comm.Get_size()} processes but {s.size}={world}: mpi4py "
                           f"was built against another MPI than the launcher's; rebuild it "
                           f"(pip install --no-binary mpi4py mpi4py) or export MASTER_ADDR")
    return comm.bcast(_this_host_address() if comm.Get_rank() == 0 else None, root=0)


def _this_host_address() -> str:
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        return host
    # Debian-style /etc/hosts maps the own hostname to 127.0.1.1: useless to other nodes,
    # while the bare hostname resolves correctly on them (and to loopback on this one).
    return host if addr.startswith("127.") else addr


def _master_port(env: Mapping[str, str], job_id: str | None) -> int:
    if not env.get("MASTER_PORT"):
        return port_from_job_id(job_id)
    port = _int(env, "MASTER_PORT", _SINGLE)
    if not 1 <= port <= 65535:
        raise DistEnvError(f"MASTER_PORT={port} is not a TCP port; set it to 1024-65535 or "
                           f"unset it")
    return port


def port_from_job_id(job_id: str | None, base: int = 20000, span: int = 20000) -> int:
    """A rendezvous port every rank of a job derives alike; jobs sharing a node rarely collide."""
    if span < 1 or base < 1 or base + span > 65536:
        raise ValueError(f"port range [{base}, {base + span}) does not fit in 1-65535")
    if not job_id:
        return DEFAULT_PORT
    # crc32, not hash(): Python salts str hashes per process, so ranks would disagree.
    return base + zlib.crc32(job_id.encode()) % span


def _slurm_job_id(env: Mapping[str, str]) -> str | None:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or None


def _lsf_job_id(env: Mapping[str, str]) -> str | None:
    job, index = env.get("LSB_JOBID"), env.get("LSB_JOBINDEX", "0").strip()
    if not job:
        return None
    return f"{job}_{index}" if index not in ("", "0") else job


def _scheduler_job_id(env: Mapping[str, str]) -> str | None:
    return _slurm_job_id(env) or _lsf_job_id(env)


def _int(env: Mapping[str, str], var: str, s: _Source, default: int | None = None) -> int:
    raw = env.get(var)
    if raw is None or (raw.strip() == "" and default is not None):
        if default is None:
            raise DistEnvError(f"{var} is not set; {s.fix}")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        fix = f"; {s.fix}" if s.fix else "; set it to an integer or unset it"
        raise DistEnvError(f"{var}={raw!r} is not an integer{fix}") from None


def _first_set(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((v for v in names if env.get(v, "").strip()), None)


def _first_int(env: Mapping[str, str], names: tuple[str, ...], s: _Source, default: int) -> int:
    """The value of the first of `names` that is set, else `default`."""
    var = _first_set(env, names)
    return default if var is None else _int(env, var, s)


def _rankfile_master(path: str) -> str:
    """First compute host in LSF's rankfile: one line per slot, the first being the launch node."""
    try:
        with open(path) as f:
            lines = [line.split()[0] for line in f if line.strip()]
    except OSError as exc:
        raise DistEnvError(f"LSB_DJOB_RANKFILE={path!r} cannot be read ({exc.strerror}); run "
                           f"under jsrun in the LSF job, or export MASTER_ADDR") from None
    hosts = list(dict.fromkeys(lines[1:]))  # drop the launch node, de-duplicate in order
    if not hosts:
        raise DistEnvError(f"LSB_DJOB_RANKFILE={path!r} names no compute host after the launch "
                           f"node on its first line; export MASTER_ADDR")
    return hosts[0]


_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _parse_tasks_per_node(value: str, var: str) -> list[int]:
    """Slurm's compressed per-node task counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = _TASKS.fullmatch(part.strip())
        if not m:
            raise DistEnvError(f"{var}={value!r} is not a task count like '4' or '2(x3),1'; "
                               f"{_SLURM.fix}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm node list like `scontrol show hostnames` does.

    "node[01-03,07],login1" -> node01 node02 node03 node07 login1 (zero padding kept).
    """
    hosts: list[str] = []
    for token in _split_top_level(spec):
        # The last bracket varies fastest. Earlier brackets are expanded as Slurm's
        # hostlist.c does (rightmost of them outermost), so 3+ groups keep scontrol's order.
        open_ = token.rfind("[")
        if open_ < 0:
            hosts.append(token)
            continue
        close = token.index("]", open_)
        numbers = _expand_ranges(token[open_ + 1:close], spec)
        suffix = token[close + 1:]  # Slurm itself rejects text after the last bracket
        hosts += [p + n + suffix for p in _expand_prefix(token[:open_], spec) for n in numbers]
    return hosts


def _expand_prefix(prefix: str, spec: str) -> list[str]:
    open_ = prefix.rfind("[")
    if open_ < 0:
        return [prefix]
    close = prefix.index("]", open_)
    head, tail = prefix[:open_], prefix[close + 1:]
    return [name for n in _expand_ranges(prefix[open_ + 1:close], spec)
            for name in _expand_prefix(head + n + tail, spec)]


def _split_top_level(spec: str) -> list[str]:
    """Split on commas and whitespace outside brackets; check brackets pair up."""
    tokens: list[str] = []
    current, depth = "", 0
    for ch in spec + ",":  # the sentinel comma flushes the last token
        depth += (ch == "[") - (ch == "]")
        if depth not in (0, 1):
            raise ValueError(f"host list {spec!r} has unbalanced or nested brackets")
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                tokens.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError(f"host list {spec!r} has an unclosed '['")
    return tokens


def _expand_ranges(body: str, spec: str) -> list[str]:
    """ "01-03,7" -> ["01", "02", "03", "7"]: the width of the low end sets the zero padding."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part.strip())
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"host list {spec!r} has a bad range {part!r} "
                             f"(expected N or N-M with N <= M)")
        width, lo, hi = len(m[1]), int(m[1]), int(m[2] if m[2] is not None else m[1])
        out += [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    return out
