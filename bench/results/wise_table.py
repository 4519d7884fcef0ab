"""Rows of a WiSE-FT table from `dodo eval RUN --wise` results (RUN/eval/wise.json), mean ± std
over the runs given (the seeds of one method): the zero-shot model (alpha 0), WiSE-FT at the
chosen alphas, and the fine-tuned model (alpha 1), as R-Adapter's paper tabulates them.

    python bench/results/wise_table.py RUN [RUN ...] [--alphas 0.5] [--metric zeroshot --of top1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) < 2:
        return f"{pct[0]:.1f}"
    return f"{statistics.mean(pct):.1f} ± {statistics.stdev(pct):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--alphas", default="0.5", help="comma list of WiSE-FT alphas to show")
    ap.add_argument("--kind", default="zeroshot", help="the suite kind whose datasets are columns")
    ap.add_argument("--of", default="top1", help="the metric of those datasets")
    args = ap.parse_args()
    curves = [{round(r["alpha"], 3): r for r in json.loads((Path(run) / "eval" / "wise.json").read_text())["rows"]}
              for run in args.runs]
    first = curves[0][0.0]
    datasets = [k.split(".")[1] for k in first if k.startswith(f"{args.kind}.") and k.endswith(f".{args.of}")]
    datasets = [d for d in datasets if d != "ood_mean"] + (["ood_mean"] if "ood_mean" in datasets else [])
    rows = [("zero-shot (alpha 0)", 0.0)] + [(f"WiSE-FT (alpha {a})", round(float(a), 3))
                                             for a in args.alphas.split(",")] + [("fine-tuned (alpha 1)", 1.0)]
    print("| model | seeds | " + " | ".join(f"{d} {args.of}" for d in datasets) + " |")
    print("|---|---|" + "---|" * len(datasets))
    for label, alpha in rows:
        cells = [_cell([c[alpha][f"{args.kind}.{d}.{args.of}"] for c in curves]) for d in datasets]
        print(f"| {label} | {len(curves)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
