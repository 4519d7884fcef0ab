#!/usr/bin/env bash
# One rank of a dodo run, as srun or jsrun starts it:  rank.sh RUN_DIR COMMAND ARGS...
# Sends the rank's output to RUN_DIR/job/logs/rank_<rank>.log (appended across allocations,
# each allocation headed by a line naming node, job and restart) and then becomes COMMAND
# (exec), so that the scheduler's signals (USR2 before the time limit, TERM on preemption)
# reach the Python process itself (or its watchdog, which forwards them). Rank discovery proper
# is dodo/cluster/env.py's job.
set -eu
run=$1
shift
rank=${SLURM_PROCID:-${JSM_NAMESPACE_RANK:-${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}}}
export PYTHONUNBUFFERED=1
mkdir -p "$run/job/logs"
exec >>"$run/job/logs/rank_${rank}.log" 2>&1
node=${SLURMD_NODENAME:-$(hostname)}
job=${SLURM_JOB_ID:-${LSB_JOBID:-none}}
echo "dodo: rank $rank on node $node, job $job, restart ${SLURM_RESTART_COUNT:-0}, $(date '+%Y-%m-%d %H:%M:%S')"
# Run from the code snapshot taken at submit (dodo/train/provenance.py), not from the checkout.
if [ -f "$run/job/code/dodo/__init__.py" ]; then
    export PYTHONPATH="$run/job/code${PYTHONPATH:+:$PYTHONPATH}"
fi
# COMMAND is "PYTHON -m dodo run RUN": run it under the per-rank watchdog (dodo/cluster/watchdog.py),
# which forwards the scheduler's signals, and ends the rank with status 75 when its heartbeat
# stops for longer than cluster.hang_timeout_s (stacks dumped to RUN/job/stacks/ first).
if [ "${2:-}" = "-m" ] && [ "${3:-}" = "dodo" ] && [ "${DODO_WATCHDOG:-1}" = "1" ]; then
    exec "$1" -m dodo.cluster.watchdog supervise "$run" -- "$@"
fi
exec "$@"
