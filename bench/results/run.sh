#!/usr/bin/env bash
# Every run behind docs/results.md, in order, on this machine's local backend (2 CPU ranks per
# run). Runs go under $RR/runs; the data under /tmp/rd (the job files name /tmp/rd paths).
#   bench/results/run.sh            # all claims (about 2 h on a quiet 2-core machine)
#   bench/results/run.sh 003 000    # some of them
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
RR=${RR:-/tmp/rr}
DODO="$REPO/.venv/bin/dodo"
B="$REPO/bench/results"
mkdir -p "$RR" && cd "$RR"
newest() { ls -d "$RR/runs/$1/"*/ | sort | tail -1; }

# Data: the digits in their real formats, cached (bench/results/digits.py, caches.sh).
(cd "$REPO" && bench/results/caches.sh /tmp/rd)

# Stage 0: the stand-in pretrained CLIP (full InfoNCE training on all three renditions),
# exported as a Hugging Face CLIPModel folder the other jobs load from model.clip.path.
if [ ! -f /tmp/rd/export/clip/model.safetensors ]; then
  "$DODO" submit "$B/jobs/pretrain_clip.yaml"
  "$DODO" export "$(newest pretrain_clip)" --format merged --out /tmp/rd/export
fi

claims=${*:-"003 000 002 004 001"}
for claim in $claims; do
  case $claim in
    003) "$DODO" sweep "$B/jobs/cls_clip.yaml" --points "$B/points/r_adapter.yaml" --grid data.seed=0,1,2
         sweep=$(newest cls_clip)
         for p in "$sweep"p0[0-2]; do "$DODO" eval "$p" --wise; done   # full_ft points: WiSE-FT
         "$DODO" table "$sweep" --layout idood --metric top1
         "$REPO/.venv/bin/python" "$B/wise_table.py" "$sweep"p0[0-2] ;;
    000) "$DODO" chain "$B/chains/masked_digits.yaml"
         "$DODO" table "$(newest masked_digits)" --layout retrieval --dataset digits ;;
    002) "$DODO" chain "$B/chains/moe_digits.yaml" train.steps=200
         "$DODO" table "$(newest moe_digits)" --layout methods --metrics eval.loss 'eval.bleu4' 'eval.cider' ;;
    004) "$DODO" chain "$B/chains/vlmo_digits.yaml"
         "$DODO" table "$(newest vlmo_digits)" --layout idood --metric r_mean ;;
    001) "$DODO" sweep "$B/jobs/prompt_digits.yaml" --points "$B/points/prompts.yaml" --grid model.prompt.shot_seed=1,2,3
         "$DODO" table "$(newest prompt_digits)" --layout methods --metrics 'eval.prompt.*'
         "$DODO" sweep "$B/jobs/ft_clip.yaml" --points "$B/points/hard.yaml" --grid data.seed=0,1,2
         "$DODO" table "$(newest ft_clip)" --layout idood --metric r_mean
         "$B/run.sh" 001-lang ;;
    001-lang)  # the language adapter: a German BERT pretrained by MLM (and its random-init control)
         "$REPO/.venv/bin/python" "$B/german_bert.py" /tmp/rd/bert_de /tmp/rd/text_de/corpus.txt /tmp/rd/text_de/val.txt \
             --extra /tmp/rd/templates_de.txt /tmp/rd/classnames_de.txt
         "$REPO/.venv/bin/python" "$B/german_bert.py" /tmp/rd/bert_de_random /tmp/rd/text_de/corpus.txt \
             /tmp/rd/text_de/val.txt --steps 0 --tokenizer /tmp/rd/bert_de
         "$DODO" sweep "$B/jobs/lang_digits.yaml" --points "$B/points/lang.yaml" --grid data.seed=0,1,2
         "$DODO" table "$(newest lang_digits)" --layout idood --metric top1
         "$DODO" table "$(newest lang_digits)" --layout idood --metric r_mean --dataset retrieval
         "$DODO" table "$(newest lang_digits)" --layout retrieval --dataset digits
         "$DODO" submit "$B/jobs/clip_zeroshot.yaml" ;;  # the CLIP rows: English; German read by CLIP itself
    *) echo "unknown claim $claim (003 000 002 004 001 001-lang)" >&2; exit 2 ;;
  esac
done
