"""Rank discovery: one test per launcher convention, on explicit environ dicts, plus one real
mpirun run that rendezvouses torch.distributed through the discovered address."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dodo.cluster.env import DEFAULT_PORT, DistEnv, discover, expand_hostlist, port_from_job_id


def slurm_env(rank: int = 0, **extra: str) -> dict[str, str]:
    """What srun gives task `rank` of a 2-node, 4-task step (2 tasks per node)."""
    env = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2), "SLURM_NTASKS": "4",
           "SLURM_NODEID": str(rank // 2), "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "1234"}
    return env | extra


def jsrun_env(rank: int = 0, **extra: str) -> dict[str, str]:
    """What jsrun gives rank `rank` of 12 ranks, 6 per node (Summit's one rank per GPU)."""
    env = {"JSM_NAMESPACE_RANK": str(rank), "JSM_NAMESPACE_LOCAL_RANK": str(rank % 6),
           "JSM_NAMESPACE_SIZE": "12", "JSM_NAMESPACE_LOCAL_SIZE": "6", "LSB_JOBID": "777"}
    return env | extra


def ompi_env(rank: int = 0, **extra: str) -> dict[str, str]:
    env = {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % 2),
           "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    return env | extra


# ---- launchers --------------------------------------------------------------------------------

def test_torchrun() -> None:
    env = discover({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                    "GROUP_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"})
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                          master_addr="n1", master_port=29400, node_rank=1, source="torchrun",
                          job_id=None)


def test_torchrun_without_local_world_size_is_one_node() -> None:
    env = discover({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2"})
    assert (env.local_world_size, env.node_rank, env.master_addr) == (3, 0, "127.0.0.1")


def test_deepspeed_launcher_names() -> None:
    # DeepSpeed's launcher says LOCAL_SIZE and CROSS_RANK where torchrun says
    # LOCAL_WORLD_SIZE and GROUP_RANK.
    env = discover({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                    "CROSS_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.local_world_size, env.node_rank, env.source) == (2, 1, "torchrun")


def test_slurm() -> None:
    env = discover(slurm_env(rank=3))
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                          master_addr="node01", master_port=port_from_job_id("1234"),
                          node_rank=1, source="slurm", job_id="1234")


@pytest.mark.parametrize("nodelist, master", [
    ("n[1-2]", "n1"),
    ("node[01-03,07]", "node01"),
    ("a[1-2],b3", "a1"),
    ("rack[1-2]-node[01-02]", "rack1-node01"),
    ("gpu17", "gpu17"),
])
def test_slurm_master_is_first_host(nodelist: str, master: str) -> None:
    assert discover(slurm_env(SLURM_JOB_NODELIST=nodelist)).master_addr == master
    legacy = slurm_env(SLURM_NODELIST=nodelist)
    del legacy["SLURM_JOB_NODELIST"]
    assert discover(legacy).master_addr == master


@pytest.mark.parametrize("var, value, node, local_world", [
    ("SLURM_TASKS_PER_NODE", "2(x3)", 2, 2),
    ("SLURM_TASKS_PER_NODE", "2,1", 1, 1),
    ("SLURM_TASKS_PER_NODE", "2(x2),1", 2, 1),
    ("SLURM_NTASKS_PER_NODE", "2", 2, 2),
])
def test_slurm_tasks_per_node(var: str, value: str, node: int, local_world: int) -> None:
    environ = slurm_env(rank=4, SLURM_NTASKS="5", SLURM_NODEID=str(node), SLURM_LOCALID="0")
    del environ["SLURM_TASKS_PER_NODE"]
    assert discover(environ | {var: value}).local_world_size == local_world


def test_slurm_ntasks_per_node_wins_over_tasks_per_node() -> None:
    env = discover(slurm_env(SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="4"))
    assert env.local_world_size == 2


def test_slurm_array_job_id() -> None:
    env = discover(slurm_env(SLURM_ARRAY_JOB_ID="1200", SLURM_ARRAY_TASK_ID="7"))
    assert env.job_id == "1200_7"
    assert env.master_port == port_from_job_id("1200_7")


def test_salloc_shell_is_not_a_slurm_launch() -> None:
    # An salloc shell has the job's variables but was not started by srun.
    env = discover({"SLURM_JOB_ID": "99", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NTASKS": "8"})
    assert (env.source, env.rank, env.world_size, env.job_id) == ("single", 0, 1, "99")


def test_jsrun_rankfile_drops_the_launch_node(tmp_path: Path) -> None:
    rankfile = tmp_path / "rankfile"
    # One line per slot; the first is the batch (launch) node, which runs no ranks.
    rankfile.write_text("batch3\n" + "h17\n" * 6 + "h05\n" * 6)
    env = discover(jsrun_env(rank=8, LSB_DJOB_RANKFILE=str(rankfile)))
    assert env == DistEnv(rank=8, local_rank=2, world_size=12, local_world_size=6,
                          master_addr="h17", master_port=port_from_job_id("777"), node_rank=1,
                          source="jsrun", job_id="777")


@pytest.mark.parametrize("index, job_id", [("0", "777"), ("3", "777_3"), ("", "777")])
def test_jsrun_job_id(index: str, job_id: str) -> None:
    env = discover(jsrun_env(MASTER_ADDR="h1", LSB_JOBINDEX=index))
    assert env.job_id == job_id


def test_jsrun_reads_no_rankfile_when_master_addr_is_set() -> None:
    env = discover(jsrun_env(MASTER_ADDR="h9", LSB_DJOB_RANKFILE="/nonexistent/rankfile"))
    assert env.master_addr == "h9"


def test_openmpi() -> None:
    env = discover(ompi_env(rank=3, MASTER_ADDR="n1"))
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2,
                          master_addr="n1", master_port=DEFAULT_PORT, node_rank=1,
                          source="openmpi", job_id=None)


def test_openmpi_node_rank_ignores_ompi_node_rank() -> None:
    # OMPI_COMM_WORLD_NODE_RANK is a rank within the node (across jobs), not the node's index.
    env = discover(ompi_env(rank=3, MASTER_ADDR="n1", OMPI_COMM_WORLD_NODE_RANK="1"))
    assert env.node_rank == 1
    assert discover(ompi_env(rank=1, MASTER_ADDR="n1",
                             OMPI_COMM_WORLD_NODE_RANK="1")).node_rank == 0


def test_mpirun_inside_slurm_allocation_is_openmpi() -> None:
    # mpirun's daemons are srun tasks; their SLURM_PROCID leaks into the ranks.
    environ = slurm_env(rank=0, SLURM_NTASKS="2") | ompi_env(rank=3, MASTER_ADDR="n1")
    env = discover(environ)
    assert (env.source, env.rank, env.job_id) == ("openmpi", 3, "1234")


def test_single() -> None:
    assert discover({}) == DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                                   master_addr="127.0.0.1", master_port=DEFAULT_PORT,
                                   node_rank=0, source="single", job_id=None)


def test_precedence(tmp_path: Path) -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1"}
    slurm = slurm_env(rank=1)
    jsrun = jsrun_env(rank=1, MASTER_ADDR="h1")
    ompi = ompi_env(rank=1)
    assert discover(ompi | jsrun | slurm | torchrun).source == "torchrun"
    assert discover(ompi | jsrun | slurm).source == "slurm"
    assert discover(ompi | jsrun).source == "jsrun"
    assert discover(ompi | {"MASTER_ADDR": "n1"}).source == "openmpi"


def test_master_addr_and_port_overrides() -> None:
    env = discover(slurm_env(MASTER_ADDR="10.0.0.5", MASTER_PORT="23456"))
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 23456)


def test_port_is_deterministic_and_in_range() -> None:
    ports = {discover(slurm_env(rank=r)).master_port for r in range(4)}
    assert ports == {port_from_job_id("1234")}
    for job in ["1", "1234", "98765_3", "lsf-42", "x" * 100]:
        assert 20000 <= port_from_job_id(job) < 40000
        assert 30000 <= port_from_job_id(job, base=30000, span=100) < 30100
    assert len({port_from_job_id(str(j)) for j in range(1000, 1100)}) > 90  # spread out
    assert port_from_job_id(None) == port_from_job_id("") == DEFAULT_PORT


def test_port_is_the_same_in_another_process() -> None:
    # Guards against hash(): Python salts it per process, so ranks would disagree.
    code = "from dodo.cluster.env import port_from_job_id; print(port_from_job_id('1234_5'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"PYTHONHASHSEED": "123"}).stdout
    assert int(out) == port_from_job_id("1234_5")


def test_export(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    for name in names:
        monkeypatch.delenv(name, raising=False)  # so monkeypatch restores them afterwards
    discover(slurm_env(rank=3)).export()
    assert {n: os.environ[n] for n in names} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node01", "MASTER_PORT": str(port_from_job_id("1234"))}


# ---- the mpi4py broadcast, with a stand-in for MPI -------------------------------------------

def fake_mpi4py(size: int, rank: int) -> types.ModuleType:
    comm = types.SimpleNamespace(Get_size=lambda: size, Get_rank=lambda: rank,
                                 bcast=lambda obj, root: obj if rank == root else "rank0-host")
    return types.SimpleNamespace(MPI=types.SimpleNamespace(COMM_WORLD=comm))  # type: ignore


def test_master_addr_broadcast_with_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", fake_mpi4py(size=4, rank=1))
    assert discover(ompi_env(rank=1)).master_addr == "rank0-host"


def test_mpi_of_another_launcher_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # mpi4py built against another MPI runs as a singleton: size 1.
    monkeypatch.setitem(sys.modules, "mpi4py", fake_mpi4py(size=1, rank=0))
    with pytest.raises(ValueError, match="mpi4py sees 1 processes but OMPI_COMM_WORLD_SIZE=4"):
        discover(ompi_env(rank=1))


def test_without_mpi_one_node_uses_loopback_and_several_nodes_fail() -> None:
    one_node = ompi_env(rank=1, OMPI_COMM_WORLD_LOCAL_SIZE="4")
    assert discover(one_node, use_mpi=False).master_addr == "127.0.0.1"
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        discover(jsrun_env(rank=1), use_mpi=False)


# ---- errors name the variable or file and the fix --------------------------------------------

@pytest.mark.parametrize("environ, message", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
    (slurm_env(SLURM_PROCID="4"), r"SLURM_PROCID=4 is not in \[0, SLURM_NTASKS=4\)"),
    (slurm_env(SLURM_LOCALID="2"), r"SLURM_LOCALID=2 is not in \[0, SLURM_TASKS_PER_NODE=2\)"),
    (slurm_env(SLURM_TASKS_PER_NODE="2x2"), "SLURM_TASKS_PER_NODE='2x2' is not a task count"),
    (slurm_env(SLURM_JOB_NODELIST="n[1-2"), "unclosed"),
    ({k: v for k, v in slurm_env().items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS is not set"),
    (jsrun_env(JSM_NAMESPACE_RANK=""), "JSM_NAMESPACE_RANK='' is not an integer"),
    (jsrun_env(LSB_DJOB_RANKFILE="/nonexistent/rankfile"), "LSB_DJOB_RANKFILE='/nonexistent"),
    (ompi_env(OMPI_COMM_WORLD_SIZE="0", MASTER_ADDR="n1"), "OMPI_COMM_WORLD_SIZE=0 must be"),
    (slurm_env(MASTER_PORT="http"), "MASTER_PORT='http' is not an integer"),
    (slurm_env(MASTER_PORT="70000"), "MASTER_PORT=70000 is not a TCP port"),
])
def test_errors(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        discover(environ, use_mpi=False)


def test_rankfile_with_only_the_launch_node(tmp_path: Path) -> None:
    rankfile = tmp_path / "rankfile"
    rankfile.write_text("batch3\n")
    with pytest.raises(ValueError, match="names no compute host"):
        discover(jsrun_env(LSB_DJOB_RANKFILE=str(rankfile)))


# ---- host lists ------------------------------------------------------------------------------

HOSTLISTS = {
    "n[1-2]": ["n1", "n2"],
    "node[01-03,07]": ["node01", "node02", "node03", "node07"],
    "a[1-2],b3": ["a1", "a2", "b3"],
    "rack[1-2]-node[01-02]": ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
    # Slurm's hostlist.c expands the brackets before the last one rightmost-outermost.
    "a[1-2]b[3-4]c[5-6]": ["a1b3c5", "a1b3c6", "a2b3c5", "a2b3c6",
                           "a1b4c5", "a1b4c6", "a2b4c5", "a2b4c6"],
    "n[8-10]": ["n8", "n9", "n10"],
    "n[098-101]": ["n098", "n099", "n100", "n101"],
    "login1": ["login1"],
    "x[1-2],y[01-02],z": ["x1", "x2", "y01", "y02", "z"],
}


@pytest.mark.parametrize("spec", HOSTLISTS)
def test_expand_hostlist(spec: str) -> None:
    assert expand_hostlist(spec) == HOSTLISTS[spec]


def test_expand_hostlist_edges() -> None:
    assert expand_hostlist("") == []
    assert expand_hostlist("a, b\tc") == ["a", "b", "c"]
    for bad in ["n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[[1]]"]:
        with pytest.raises(ValueError, match="host list"):
            expand_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not installed")
@pytest.mark.parametrize("spec", HOSTLISTS)
def test_expand_hostlist_matches_scontrol(spec: str) -> None:
    out = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"scontrol show hostnames {spec!r} failed: {out.stderr}"
    assert expand_hostlist(spec) == out.stdout.split()


# ---- real processes --------------------------------------------------------------------------

WORKER = """
import dataclasses, json, sys
import torch
import torch.distributed as dist
from dodo.cluster.env import discover

env = discover()  # MASTER_ADDR is unset: rank 0's address comes over MPI
env.export()
dist.init_process_group("gloo")  # env://, from what export() set
value = torch.tensor([env.rank + 1.0])
dist.all_reduce(value)
# One file per rank: two ranks printing to one pipe can interleave their lines.
with open(f"{sys.argv[1]}/result_{env.rank}.json", "w") as f:
    json.dump(dataclasses.asdict(env) | {"reduced": value.item()}, f)
dist.destroy_process_group()
"""

# Variables of an outer launcher that would make the child take another path.
OUTER_LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "LOCAL_SIZE", "CROSS_RANK", "MASTER_ADDR", "MASTER_PORT")
OUTER_PREFIXES = ("SLURM_", "JSM_", "LSB_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")


@pytest.mark.multiprocess
def test_mpirun_two_ranks_rendezvous(tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("mpirun is not on PATH; CI must install openmpi-bin")
        pytest.skip("mpirun is not on PATH (install openmpi-bin)")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items()
           if k not in OUTER_LAUNCHER and not k.startswith(OUTER_PREFIXES)}
    # A free port rather than the no-job-id default 29500, which another run may hold.
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "MASTER_PORT": str(port)}
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none",
           "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
           sys.executable, str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun did not finish in 120 s (a rendezvous hang?):\n{exc.stdout}\n"
                    f"{exc.stderr}")
    assert proc.returncode == 0, f"mpirun failed:\n{proc.stdout}\n{proc.stderr}"
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result_*.json"))]
    assert len(results) == 2, proc.stdout + proc.stderr
    assert {r["rank"] for r in results} == {0, 1}
    assert all(r["source"] == "openmpi" and r["world_size"] == 2 for r in results)
    rendezvous = {(r["master_addr"], r["master_port"]) for r in results}
    assert len(rendezvous) == 1 and rendezvous.pop()[1] == port, results
    assert all(r["reduced"] == 3.0 for r in results)
