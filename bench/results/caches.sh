#!/usr/bin/env bash
# Write the digits dataset (bench/results/digits.py) in its real formats and cache every part
# with `dodo data cache`, as docs/data.md does for COCO and ImageNet. Idempotent: a finished
# cache is kept (dodo data cache resumes or refuses to overwrite a different one).
#   bench/results/caches.sh /tmp/results_data
set -euo pipefail
OUT=${1:?usage: bench/results/caches.sh OUT_FOLDER}
PY=${PYTHON:-.venv/bin/python}
DODO=${DODO:-.venv/bin/dodo}
[ -f "$OUT/captions/dataset_digits.json" ] || "$PY" bench/results/digits.py "$OUT"
"$PY" bench/results/tokenizer.py "$OUT/tokenizer/tokenizer.json" "$OUT/text/corpus.txt"
C="$OUT/caches"; mkdir -p "$C"
cache() { local out=$1; shift; [ -f "$C/$out/manifest.json" ] || "$DODO" data cache "$@" --out "$C/$out" --image-size 32 --workers 2 >/dev/null; }
cache train    "$OUT/captions/dataset_digits.json" --from karpathy --images "$OUT/captions/images" --split train,restval --dataset digits
cache val      "$OUT/captions/dataset_digits.json" --from karpathy --images "$OUT/captions/images" --split val --dataset digits
cache pretrain "$OUT/pretrain_captions/dataset_digits.json" --from karpathy --images "$OUT/pretrain_captions/images" --split train,restval --dataset digits
cache pretrain_val "$OUT/pretrain_captions/dataset_digits.json" --from karpathy --images "$OUT/pretrain_captions/images" --split val --dataset digits
cache test     "$OUT/captions/dataset_digits.json" --from karpathy --images "$OUT/captions/images" --split test --dataset digits
for s in inverted tinted; do
  cache test_$s "$OUT/shift_captions/$s/dataset_digits.json" --from karpathy --images "$OUT/shift_captions/$s/images" --split test --dataset digits_$s
  cache cls_test_$s "$OUT/shift/$s/test" --from folder --dataset digits_$s --split test
done
cache cls_train "$OUT/folders/train" --from folder --dataset digits --split train
cache cls_test  "$OUT/folders/test"  --from folder --dataset digits --split test
cache text "$OUT/text/corpus.txt" --from text --tokenizer "$OUT/tokenizer/tokenizer.json" --block 16
# German (the language adapter, seed 001): EN-DE pairs of the train / val scans, German captions
# of the test scans and their renditions (the images are the English sets').
[ -f "$OUT/parallel/train_en_de.jsonl" ] || "$PY" bench/results/digits.py "$OUT" --german
cache parallel_train "$OUT/parallel/train_en_de.jsonl" --from parallel
cache parallel_val   "$OUT/parallel/val_en_de.jsonl" --from parallel
cache test_de "$OUT/captions_de/dataset_digits.json" --from karpathy --images "$OUT/captions/images" --split test --dataset digits_de
for s in inverted tinted; do
  cache test_de_$s "$OUT/shift_captions_de/$s/dataset_digits.json" --from karpathy --images "$OUT/shift_captions/$s/images" --split test --dataset digits_de_$s
done
cp bench/results/templates.txt "$OUT/templates.txt"
echo "caches in $C"
