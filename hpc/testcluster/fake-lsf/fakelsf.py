#!/usr/bin/env python3
"""A stand-in for LSF on one machine: bsub, bjobs, bkill, brequeue and jsrun, for dodo's tests.

THIS IS NOT LSF. No LSF exists where dodo was developed; these commands imitate the parts of
LSF's behaviour dodo relies on, so that the bsub scripts dodo renders can run end to end:

  bsub < script      reads #BSUB -J/-o/-e/-w/-q/-W/-wa/-wt (command-line options win), prints
                     "Job <N> is submitted to queue <q>.", runs the script with bash in its own
                     session once its dependency (-w "ended(N)" / "done(N)" / 'done("name")', joined by &&) is met, with
                     LSB_JOBID, LSB_JOBINDEX, LSB_JOBNAME and LSB_DJOB_RANKFILE set. Arrays
                     (-J "name[1-N]%P") run one element per index. Queues other than those in
                     $FAKE_LSF_QUEUES (default "batch debug") are refused as LSF refuses them.
                     -W / -wa / -wt are honoured with $FAKE_LSF_MINUTE seconds per minute
                     (default 60): the warning signal, then the run limit kill.
  bjobs -o "jobid stat" -noheader ID    PEND | RUN | DONE | EXIT, one line per element
  bkill [-s SIG] ID  a signal to every process of the job, or (no -s) TERM then KILL -> EXIT
  brequeue ID        kill a running job and run it again with the same id
  jsrun -n N ...     `mpirun -np N` (Open MPI sets the OMPI_COMM_WORLD_* variables that
                     Spectrum MPI sets under jsrun); the resource-set flags are accepted and ignored

State lives in $FAKE_LSF_DIR (default /tmp/fake-lsf-<uid>).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

STATE = Path(os.environ.get("FAKE_LSF_DIR", f"/tmp/fake-lsf-{os.getuid()}"))
MINUTE = float(os.environ.get("FAKE_LSF_MINUTE", "60"))
QUEUES = os.environ.get("FAKE_LSF_QUEUES", "batch debug").split()
ENDED = ("DONE", "EXIT")


@contextmanager
def locked():
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def job_file(job: str) -> Path:
    return STATE / f"job_{job}.json"


def load(job: str) -> dict | None:
    try:
        return json.loads(job_file(job).read_text())
    except FileNotFoundError:
        return None


def save(data: dict) -> None:
    tmp = job_file(data["id"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, job_file(data["id"]))


def update(job: str, index: int, **fields) -> dict:
    with locked():
        data = load(job)
        data["elements"][str(index)].update(fields)
        save(data)
        return data


def parse_id(text: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(\d+)(?:\[(\d+)\])?", text.strip())
    if not m:
        fail(f"{text}: Illegal job ID.")
    return m[1], int(m[2]) if m[2] else None


def fail(message: str, code: int = 255) -> None:
    print(message, file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- bsub


def options(tokens: list[str]) -> dict[str, str]:
    opts, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and i + 1 < len(tokens):
            opts[tok] = tokens[i + 1]
            i += 2
        else:
            i += 1
    return opts


def bsub(argv: list[str]) -> int:
    script = sys.stdin.read()
    opts: dict[str, str] = {}
    for line in script.splitlines():
        if line.startswith("#BSUB"):
            opts.update(options(shlex.split(line[len("#BSUB"):])))
    opts.update(options(argv))
    queue = opts.get("-q", "batch")
    if queue not in QUEUES:
        fail(f"{queue}: No such queue. Job not submitted.")
    if ("-wa" in opts) != ("-wt" in opts):
        fail("-wa and -wt must be specified together. Job not submitted.")
    name = opts.get("-J", "NONAME")
    indices, limit = [0], 0
    m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\](?:%(\d+))?", name)
    if m:
        name, indices, limit = m[1], list(range(int(m[2]), int(m[3]) + 1)), int(m[4] or 0)
    with locked():
        counter = STATE / "next_id"
        job = str(int(counter.read_text()) if counter.exists() else 1000)
        counter.write_text(str(int(job) + 1))
        (STATE / f"script_{job}.sh").write_text(script)
        save({"id": job, "name": name, "queue": queue, "opts": opts, "limit": limit,
              "elements": {str(i): {"stat": "PEND"} for i in indices}})
    for index in indices:
        subprocess.Popen([sys.executable, __file__, "_supervise", job, str(index)], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Job <{job}> is submitted to queue <{queue}>.")
    return 0


def dependency_met(dep: str) -> bool | None:
    """True when met, False when it never will be, None while waiting. Conditions joined by &&;
    each names a job id, an element, or a job name (quoted or not: every job of that name)."""
    results = [_one_met(part) for part in dep.split("&&")] if dep.strip() else [True]
    if False in results:
        return False
    return None if None in results else True


def _one_met(dep: str) -> bool | None:
    m = re.fullmatch(r"\s*(ended|done)\((\d+(?:\[\d+\])?)\)\s*", dep)
    if not m:
        named = re.fullmatch(r"\s*(ended|done)\(\"?([^\")]+)\"?\)\s*", dep)
        if not named:
            return True
        jobs = [json.loads(p.read_text()) for p in STATE.glob("job_*.json")]
        stats = [e["stat"] for j in jobs if j["name"] == named[2] for e in j["elements"].values()]
        if not stats:
            return False  # LSF refuses a condition on a job name it does not know
        if not all(s in ENDED for s in stats):
            return None
        return named[1] == "ended" or all(s == "DONE" for s in stats)
    job, index = parse_id(m[2])
    data = load(job)
    if data is None:
        return True
    stats = [e["stat"] for i, e in data["elements"].items() if index is None or int(i) == index]
    if not all(s in ENDED for s in stats):
        return None
    return m[1] == "ended" or all(s == "DONE" for s in stats)


def supervise(job: str, index: int) -> None:
    data = load(job)
    opts = data["opts"]
    while True:  # dependency and array slot limit
        met = dependency_met(opts.get("-w", ""))
        running = sum(e["stat"] == "RUN" for e in load(job)["elements"].values())
        if met is False:
            update(job, index, stat="EXIT", reason="dependency never satisfied")
            return
        if met and (not data["limit"] or running < data["limit"]):
            break
        time.sleep(0.5)
    host = socket.gethostname()
    rankfile = STATE / f"rankfile_{job}"
    rankfile.write_text(f"batch1\n{host}\n{host}\n")  # first line: the launch node
    while True:
        env = dict(os.environ, LSB_JOBID=job, LSB_JOBINDEX=str(index), LSB_JOBNAME=data["name"],
                   LSB_DJOB_RANKFILE=str(rankfile), LSB_QUEUE=data["queue"])
        out = opts.get("-o", str(STATE / f"out_{job}_%I.txt")).replace("%J", job).replace("%I", str(index))
        err = opts.get("-e", out).replace("%J", job).replace("%I", str(index))
        with open(out, "a") as fo, open(err, "a") as fe:
            proc = subprocess.Popen(["bash", str(STATE / f"script_{job}.sh")], env=env, stdout=fo,
                                    stderr=fe if err != out else subprocess.STDOUT, start_new_session=True,
                                    stdin=subprocess.DEVNULL)
        update(job, index, stat="RUN", pgid=proc.pid, requeue=False, started=time.time())
        code = wait_with_limits(proc, opts)
        element = load(job)["elements"][str(index)]
        if element.get("requeue"):
            update(job, index, stat="PEND", requeue=False, pgid=None)
            time.sleep(1)
            continue
        stat = "DONE" if code == 0 and not element.get("killed") else "EXIT"
        update(job, index, stat=stat, exit_code=code, pgid=None)
        return


def wait_with_limits(proc: subprocess.Popen, opts: dict[str, str]) -> int:
    """Wait; send the -wa signal -wt minutes before the -W run limit; kill at the limit."""
    start = time.time()
    limit = _minutes(opts["-W"]) * MINUTE if "-W" in opts else None
    warn_at = limit - _minutes(opts["-wt"]) * MINUTE if limit and "-wt" in opts else None
    warned = False
    while proc.poll() is None:
        elapsed = time.time() - start
        if warn_at is not None and not warned and elapsed >= warn_at:
            signal_tree(proc.pid, getattr(signal, "SIG" + opts["-wa"].removeprefix("SIG")))
            warned = True
        if limit is not None and elapsed >= limit:
            terminate(proc.pid)
        time.sleep(0.2)
    return proc.returncode


def _minutes(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return parts[0] * 60 + parts[1] if len(parts) == 2 else parts[0]


# ---------------------------------------------------------------- signals


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def signal_tree(pgid: int, sig: int) -> None:
    """Every process of the job, as LSF signals all of a job's processes."""
    for pid in descendants(pgid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def terminate(pgid: int) -> None:
    signal_tree(pgid, signal.SIGTERM)
    for _ in range(20):
        if not Path(f"/proc/{pgid}").exists():
            return
        time.sleep(0.1)
    signal_tree(pgid, signal.SIGKILL)


def elements(text: str) -> tuple[dict, list[str]]:
    job, index = parse_id(text)
    data = load(job)
    if data is None:
        fail(f"Job <{text}> is not found")
    keys = [k for k in data["elements"] if index is None or int(k) == index]
    if not keys:
        fail(f"Job <{text}> is not found")
    return data, keys


def bjobs(argv: list[str]) -> int:
    ids = [a for a in argv if re.fullmatch(r"\d+(\[\d+\])?", a)]
    for text in ids:
        data, keys = elements(text)
        for k in keys:
            print(f"{data['id']} {data['elements'][k]['stat']}")
    return 0


def bkill(argv: list[str]) -> int:
    opts = options(argv)
    sig = opts.get("-s")
    for text in [a for a in argv if re.fullmatch(r"\d+(\[\d+\])?", a)]:
        data, keys = elements(text)
        for k in keys:
            element = data["elements"][k]
            if sig:
                if element.get("pgid"):
                    signal_tree(element["pgid"], getattr(signal, "SIG" + sig.removeprefix("SIG")))
                print(f"Job <{text}> is being signaled")
                continue
            update(data["id"], int(k), killed=True)
            if element["stat"] == "PEND":
                update(data["id"], int(k), stat="EXIT")
            elif element.get("pgid"):
                terminate(element["pgid"])
            print(f"Job <{text}> is being terminated")
    return 0


def brequeue(argv: list[str]) -> int:
    for text in [a for a in argv if re.fullmatch(r"\d+(\[\d+\])?", a)]:
        data, keys = elements(text)
        for k in keys:
            element = data["elements"][k]
            if element["stat"] != "RUN":
                fail(f"Job <{text}>: Job is not running")
            update(data["id"], int(k), requeue=True)
            print(f"Job <{text}> is being requeued")
            sys.stdout.flush()
            # Detached: brequeue called from inside the job must not kill itself first.
            subprocess.Popen([sys.executable, __file__, "_terminate", str(element["pgid"])],
                             start_new_session=True, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


# ---------------------------------------------------------------- jsrun


def jsrun(argv: list[str]) -> int:
    i, count = 0, None
    takes_value = {"-n", "--nrs", "-a", "-g", "-c", "-r", "--bind", "-d", "-l", "-b", "-E"}
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-n", "--nrs"):
            count = argv[i + 1]
        i += 2 if argv[i] in takes_value else 1
    if count is None or i >= len(argv):
        fail("jsrun: usage: jsrun -n <resource sets> [...] command", 1)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = ["mpirun", "-np", count, "--oversubscribe", "--bind-to", "none", "--mca", "btl", "self,tcp",
           "--mca", "btl_tcp_if_include", "lo", *argv[i:]]
    os.execvpe("mpirun", cmd, env)
    return 1


def main() -> int:
    tool, argv = Path(sys.argv[1]).name, sys.argv[2:]
    if tool == "_supervise":
        supervise(argv[0], int(argv[1]))
        return 0
    if tool == "_terminate":
        time.sleep(0.5)
        terminate(int(argv[0]))
        return 0
    return {"bsub": bsub, "bjobs": bjobs, "bkill": bkill, "brequeue": brequeue, "jsrun": jsrun}[tool](argv)


if __name__ == "__main__":
    sys.exit(main())
