#!/bin/bash
# dodo chain masked: the submissions `dodo chain` made, in order; rendered
# by dodo/cluster/chain_submit.py. Each stage waits for the stages whose run directories it takes.
set -euo pipefail
bsub < /gpfs/runs/masked/CHAIN/mim/job/lsf.bsub  # -J masked.mim.TOKEN
bsub < /gpfs/runs/masked/CHAIN/mlm/job/lsf.bsub  # -J masked.mlm.TOKEN
bsub -w 'done("masked.mim.TOKEN") && done("masked.mlm.TOKEN")' -ti < /gpfs/runs/masked/CHAIN/transfer/job/lsf.bsub  # -J masked.transfer.TOKEN
