"""VLMo's VQA and NLVR2 fine-tuning at tiny scale, end to end (docs/methods.md, VLMo).

Writes VQA v2 / NLVR2 in their official formats with the tests' writers (tests/vqa_data.py:
coloured buses / dogs / cats, 3 questions with 10 annotator answers per picture, 3 statements
per image pair), caches them with `dodo data cache --from vqa / --from nlvr2`, and runs
jobs/vlmo_vqa.yaml, then jobs/vlmo_nlvr2.yaml from the VQA run (init_from), 2 CPU ranks each.
Prints the held-out metrics before and after training.

    .venv/bin/python bench/vlmo_finetune_tiny.py OUT_DIR [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from data_helpers import write_word_tokenizer  # noqa: E402
from vqa_data import all_texts, write_nlvr2, write_vqa  # noqa: E402


def dodo(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "dodo", *args], cwd=cwd, check=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    out = a.out.resolve()
    raw, caches = out / "raw", out / "caches"
    q_train = write_vqa(raw / "vqa", "train2014", list(range(240)))
    q_val = write_vqa(raw / "vqa", "val2014", list(range(240, 320)))
    n_train = write_nlvr2(raw / "nlvr2", "train", 240)
    n_dev = write_nlvr2(raw / "nlvr2", "dev", 60, offset=500)
    tok = write_word_tokenizer(out / "tokenizer" / "tokenizer.json", all_texts())
    for src, kind, name, extra in ((q_train, "vqa", "vqa_train", ["--min-count", "3"]),
                                   (q_val, "vqa", "vqa_val", []), (n_train, "nlvr2", "nlvr2_train", []),
                                   (n_dev, "nlvr2", "nlvr2_dev", [])):
        if not (caches / name / "manifest.json").exists():
            dodo("data", "cache", str(src), "--from", kind, "--image-size", "32", "--out", str(caches / name),
                 *extra, cwd=REPO)
    common = [f"model.tokenizer={tok}", f"train.steps={a.steps}", f"train.save_every={a.steps}",
              "train.eval_every=1000", "train.log_every=25", f"runs_dir={out / 'runs'}"]
    started = time.time()
    dodo("submit", "jobs/vlmo_vqa.yaml", *common, f"data.train_cache={caches / 'vqa_train'}",
         f"data.eval_cache={caches / 'vqa_val'}", cwd=REPO)
    vqa_run = sorted((out / "runs" / "vlmo_vqa").iterdir())[-1]
    vqa_s = time.time() - started
    dodo("submit", "jobs/vlmo_nlvr2.yaml", *common, f"data.train_cache={caches / 'nlvr2_train'}",
         f"data.eval_cache={caches / 'nlvr2_dev'}", f"model.vlmo.init_from={vqa_run}", cwd=REPO)
    nlvr2_run = sorted((out / "runs" / "vlmo_nlvr2").iterdir())[-1]
    for run, wall in ((vqa_run, vqa_s), (nlvr2_run, time.time() - started - vqa_s)):
        s = json.loads((run / "summary.json").read_text())
        keys = [k for k in s["final"] if k.startswith("eval.")]
        print(f"{run}: {wall:.0f} s wall")
        for k in keys:
            before = s.get("initial", {}).get(k)
            print(f"  {k:28} {before if before is None else round(before, 4)} -> {s['final'][k]:.4f}")


if __name__ == "__main__":
    main()
