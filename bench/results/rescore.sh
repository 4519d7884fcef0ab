#!/usr/bin/env bash
# Reruns the job's eval.suites on the final checkpoint of every finished run of a sweep or chain
# (`dodo eval RUN --task suites`, written to RUN/eval/suites.json), for the tables made before a
# metric changed; `dodo table FOLDER --rescored ...` then reads them. Runs without suites (a
# chain's pretext stages) are skipped.
#   bench/results/rescore.sh runs/masked_digits/chain_<id> [more folders...]
set -euo pipefail
for folder in "$@"; do
  for summary in "$folder"/*/summary.json; do
    run=$(dirname "$summary")
    if grep -q '"eval_datasets": {}' "$summary"; then
      echo "skip $run (no eval.suites)"; continue
    fi
    start=$(date +%s)
    dodo eval "$run" --task suites > "$run/eval_suites.log" 2>&1 || { echo "FAILED $run: $run/eval_suites.log"; exit 1; }
    echo "$run: $(( $(date +%s) - start )) s"
  done
done
