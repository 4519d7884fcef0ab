"""Where a job runs: the scheduler, the allocation's shape, and the site's rules.

A job names a cluster profile (`cluster: summit`, a file in hpc/clusters/, see
dodo/cluster/profiles.py) and may override any field. Fields split into what the job asks
for (nodes, ranks per node, time, requeues) and what the site is (GPUs and cores a node has,
whether an account is required, module lines); the checks below compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dodo.config.errors import check


MAX_COUNT = 100_000  # nodes, ranks, threads: far above any real allocation, far below int64
LOCAL_RANKS_PER_CPU = 4  # the local backend oversubscribes cores at most this much


@dataclass
class HangTimeouts:
    """Seconds a rank may go without a heartbeat, per phase (dodo/cluster/watchdog.py)."""

    startup: float = 600.0  # launch to the first step: imports, process group, data, resume
    step: float = 300.0  # one optimizer step (also the process group's collective timeout)
    eval: float = 900.0  # a periodic or final evaluation
    checkpoint: float = 900.0  # one checkpoint save

    def __post_init__(self) -> None:
        for name in ("startup", "step", "eval", "checkpoint"):
            value = getattr(self, name)
            check(0 < value < 7 * 86400, name, f"must be in (0, 604800) seconds, got {value}")


@dataclass
class ClusterConfig:
    profile: str = ""  # the hpc/clusters/<profile>.yaml this section was built on ("" none)
    backend: Literal["auto", "local", "slurm", "lsf"] = "auto"
    # -- the allocation the job asks for
    nodes: int = 1
    tasks_per_node: int = 2  # ranks per node (one per GPU on a cluster, per process locally)
    threads_per_task: int = 1  # OMP/torch threads per rank
    cpus_per_task: int = 0  # cores reserved per rank (sbatch --cpus-per-task, jsrun -c); 0: threads_per_task
    gpus_per_task: int = 0  # GPUs per rank (jsrun -g; Slurm gets tasks_per_node * this per node)
    time_limit_min: int = 60
    signal_lead_s: int = 90  # the warning signal (USR2) comes this long before the time limit
    max_requeues: int = 10  # continuations per submission: warning -> checkpoint -> requeue
    max_restarts: int = 2  # retries from the last checkpoint after a rank crashed or hung, per allocation
    hang_timeout_s: HangTimeouts = field(default_factory=HangTimeouts)  # see dodo/cluster/watchdog.py
    array_parallel: int = 0  # sweeps: at most this many points at once (0: as many as fit)
    # -- what a node of the site has (0: not stated, not checked)
    gpus_per_node: int = 0
    # Published bandwidths, GB/s (gigabytes): per GPU inside a node, per node between nodes;
    # 0 = unknown. Used by the expert-placement planner (model.moe.ep_size: auto, docs/scaling.md).
    nvlink_gbps: float = 0.0
    network_gbps: float = 0.0
    cpus_per_node: int = 0
    # -- Slurm
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    memory: str = ""  # per node, as sbatch --mem takes it: 64G
    # -- LSF
    project: str = ""  # bsub -P
    queue: str = ""  # bsub -q
    alloc_flags: str = ""  # bsub -alloc_flags, e.g. "gpumps smt4"
    lsf_continuation: Literal["chain", "requeue"] = "chain"  # see docs/clusters.md
    # -- both
    requires_account: bool = False  # the site refuses jobs without account (Slurm) / project (LSF)
    setup: list[str] = field(default_factory=list)  # shell lines run first: module load ..., export ...
    directives: list[str] = field(default_factory=list)  # extra sbatch/bsub options, e.g. "--exclusive"
    python: str = ""  # the interpreter on the compute nodes; "": the one that runs `dodo submit`

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "threads_per_task", "time_limit_min"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("cpus_per_task", "gpus_per_task", "signal_lead_s", "max_requeues", "max_restarts", "array_parallel",
                     "gpus_per_node", "cpus_per_node"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.signal_lead_s < self.time_limit_min * 60, "signal_lead_s",
              f"must be shorter than the time limit (cluster.time_limit_min={self.time_limit_min} min); "
              f"lower it or raise the time limit")
        where = f" of profile {self.profile!r}" if self.profile else ""
        gpus = self.tasks_per_node * self.gpus_per_task
        check(not self.gpus_per_node or gpus <= self.gpus_per_node, "tasks_per_node",
              f"asks for {self.tasks_per_node} ranks x {self.gpus_per_task} GPUs = {gpus} GPUs per node, "
              f"but a node{where} has {self.gpus_per_node}; lower cluster.tasks_per_node or "
              f"cluster.gpus_per_task, or raise cluster.nodes")
        cpus = self.tasks_per_node * self.cores_per_task
        check(not self.cpus_per_node or cpus <= self.cpus_per_node, "tasks_per_node",
              f"asks for {self.tasks_per_node} ranks x {self.cores_per_task} cores = {cpus} cores per node, "
              f"but a node{where} has {self.cpus_per_node}; lower cluster.tasks_per_node or "
              f"cluster.cpus_per_task, or raise cluster.nodes")
        if self.requires_account and self.backend == "slurm":
            check(bool(self.account), "account", f"is required by the site{where}; set it to your "
                  "allocation, e.g. cluster.account=abc123 (`sacctmgr show assoc user=$USER` lists yours)")
        if self.requires_account and self.backend == "lsf":
            check(bool(self.project), "project", f"is required by the site{where}; set it to your "
                  "allocation, e.g. cluster.project=ABC123")
        for name in ("nodes", "tasks_per_node", "threads_per_task", "cpus_per_task", "gpus_per_task"):
            check(getattr(self, name) <= MAX_COUNT, name, f"must be at most {MAX_COUNT:,} (a sane range for "
                  f"one allocation), got {getattr(self, name):,}")
        if self.backend == "local":  # all ranks on this machine: a few per core at most
            import os

            cores = os.cpu_count() or 1
            check(self.world_size <= max(8, LOCAL_RANKS_PER_CPU * cores), "tasks_per_node",
                  f"asks for {self.world_size:,} ranks on this machine, which has {cores} CPU cores; the local "
                  f"backend runs at most max(8, {LOCAL_RANKS_PER_CPU} x cores) = {max(8, LOCAL_RANKS_PER_CPU * cores)} "
                  "ranks: lower cluster.tasks_per_node (and cluster.nodes), or submit to a cluster")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def cores_per_task(self) -> int:
        return self.cpus_per_task or self.threads_per_task
