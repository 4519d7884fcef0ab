"""Sweep grids, the sweep folder, and `dodo table`, without a scheduler (the array itself runs
in tests/test_slurm.py on the real test cluster)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, dodo
from dodo.cluster import sweep as sweeps
from dodo.cluster import table as tbl
from dodo.config.errors import ConfigError
from dodo.rundir import write_json_atomic

DEMO = str(REPO / "jobs" / "demo.yaml")


def test_grid_is_the_product_in_order():
    grid = sweeps.parse_grid(["train.lr=1e-4,3e-4", "train.betas=[0.9, 0.99],[0.8, 0.9]"])
    assert grid[1] == ("train.betas", [[0.9, 0.99], [0.8, 0.9]])  # lists stay whole
    points = sweeps.expand(grid)
    assert [p.dir for p in points] == ["p0", "p1", "p2", "p3"]
    assert points[1].overrides == ("train.lr=1e-4", "train.betas=[0.8, 0.9]")
    assert points[3].label == "p3 lr=3e-4 betas=[0.8, 0.9]"


@pytest.mark.parametrize("specs, expected", [
    (["train.lr"], "malformed"),
    (["train.lr=1e-4,,3e-4"], "empty value"),
    (["cluster.nodes=1,2"], "cluster settings cannot vary"),
    (["train.lr=1,2", "train.lr=3"], "names train.lr twice"),
])
def test_bad_grids(specs, expected):
    with pytest.raises(ConfigError, match=expected):
        sweeps.parse_grid(specs)


def test_a_bad_point_writes_nothing(tmp_path: Path):
    with pytest.raises(ConfigError, match="sweep point p1 steps=-1: .*train.steps=-1: must be > 0"):
        sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.steps=5,-1"], None)
    assert not (tmp_path / "runs").exists()


def test_sweep_folder_status_and_table(tmp_path: Path):
    sweep, configs = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.lr=1e-3,3e-3", "train.seed=0,1"],
                                   None)
    assert [c.train.lr for c in configs] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert sorted(p.name for p in sweep.path.iterdir()) == ["job", "p0", "p1", "p2", "p3", "sweep.json"]
    assert "lr: 0.003" in (sweep.path / "p2" / "config.yaml").read_text()
    for i, run in enumerate(sweep.runs()[:3]):  # three finished, one never ran
        run.update_status(state="completed", step=5, total_steps=5)
        write_json_atomic(run.summary_file, {"final": {"eval.loss": 1.0 + i, "eval.caption_accuracy": 0.5},
                                             "final_train_loss": 2.0 + i})
    header, rows = sweeps.table(sweep)
    assert header == ["point", "train.lr", "train.seed", "state", "step", "trainable params", "final train loss",
                      "eval.caption_accuracy", "eval.loss"]
    assert rows[2] == ["p2", "3e-3", "0", "completed", "5", "-", "4", "0.5", "3"]
    assert rows[3][3:7] == ["never started", "0", "-", "-"]  # created, never submitted
    out = dodo("table", str(sweep.path), cwd=tmp_path).stdout
    assert out.count("\n| p") == 4 and (sweep.path / "table.csv").read_text().count("\n") == 5
    status = dodo("status", f"--runs-dir={tmp_path}/runs", cwd=tmp_path).stdout
    assert f"sweep demo/{sweep.path.name}: 4 points over train.lr x train.seed" in status
    assert "  p1 lr=1e-3 seed=1" in status and "requeues" in status
    assert json.loads(sweep.file.read_text())["points"][3]["values"] == {"train.lr": "3e-3", "train.seed": 1}


# ---------------------------------------------------------------- listed points


def test_listed_points_times_the_grid(tmp_path: Path):
    file = tmp_path / "methods.yaml"
    file.write_text("- {name: mam, model: {adapter: {kind: mam}}, train.lr: 2.0e-3}\n")
    grid, listed, points = sweeps.plan(["train.seed=0,1"], ["lora: model.adapter.kind=lora train.lr=1e-3", "base:"],
                                       str(file))
    assert [(p.name, p.values) for p in listed] == [
        ("lora", {"model.adapter.kind": "lora", "train.lr": "1e-3"}), ("base", {}),
        ("mam", {"model.adapter.kind": "mam", "train.lr": 2e-3})]
    assert [p.dir for p in points] == ["p0", "p1", "p2", "p3", "p4", "p5"]  # each point at each seed
    assert points[1].values == {"model.adapter.kind": "lora", "train.lr": "1e-3", "train.seed": 1}
    assert points[1].overrides == ("model.adapter.kind=lora", "train.lr=1e-3", "train.seed=1")
    assert points[2].label == "p2 base seed=0" and points[5].label == "p5 mam kind=mam lr=0.002 seed=1"
    alone = sweeps.plan([], ["a: train.lr=1e-3", "train.lr=2e-3"])[2]  # no grid: the points as they are
    assert [(p.name, p.overrides) for p in alone] == [("a", ("train.lr=1e-3",)), ("", ("train.lr=2e-3",))]


@pytest.mark.parametrize("specs, file_text, expected", [
    (["a: train.lr=1", "a: train.lr=2"], None, "share the label 'a'"),
    (["train.lr=1", "b: train.lr=1"], None, "set the same overrides"),
    (["a: train.seed=3"], None, "sets train.seed, which --grid varies too"),
    (["a: cluster.nodes=2"], None, "cannot vary"),
    (["a: name=other"], None, "cannot vary"),
    (["a: train.lr"], None, "'train.lr' is not key.path=value"),
    ([], "{train.lr: 1}", "expected a non-empty YAML list"),
    ([], "- [train.lr, 1]", "item 0 is list, not a mapping"),
    ([], "- {train.lr: [1, 2}", "not YAML"),
])
def test_bad_points(tmp_path: Path, specs, file_text, expected):
    path = None
    if file_text is not None:
        path = tmp_path / "points.yaml"
        path.write_text(file_text)
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        sweeps.plan(["train.seed=0,1"], specs, str(path) if path else None)


def test_bad_point_on_the_command_line_is_one_line_and_writes_nothing(tmp_path: Path):
    out = dodo("sweep", DEMO, f"runs_dir={tmp_path}/runs", "--point", "ok: train.steps=5", "--point",
               "bad: train.steps=-1", cwd=tmp_path, check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "dodo: error: sweep point p1 bad steps=-1" in out.stderr and "train.steps=-1: must be > 0" in out.stderr
    assert not (tmp_path / "runs").exists()
    missing = dodo("sweep", DEMO, "--points", str(tmp_path / "none.yaml"), cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "--points" in missing.stderr and "no such file" in missing.stderr


# ---------------------------------------------------------------- table layouts

SUITES = ("eval.suites=[{kind: zeroshot, datasets: [{name: imagenet, tag: id}, {name: imagenet_r, tag: ood}, "
          "{name: imagenet_a, tag: ood}]}]")


def finish(run, final: dict, trainable: int, record_tags: bool) -> None:
    run.update_status(state="completed", step=5, total_steps=5)
    summary = {"final": final, "final_train_loss": 1.0, "trainable_parameters": trainable}
    if record_tags:  # as dodo/train/summary.py writes it; else the table reads config.yaml
        summary["eval_datasets"] = {"zeroshot": {"imagenet": "id", "imagenet_r": "ood", "imagenet_a": "ood"}}
    write_json_atomic(run.summary_file, summary)


def test_method_layouts_mean_and_std_over_seeds(tmp_path: Path):
    sweep, _ = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs", SUITES], ["train.seed=0,1,2"], None,
                             ["adapter: model.adapter.kind=bottleneck", "full: model.adapter.kind=none"])
    runs = sweep.runs()
    for i, run in enumerate(runs[:5]):  # the last seed of "full" never finished
        m, s = divmod(i, 3)
        top1 = {"imagenet": 0.5 + 0.1 * s + 0.2 * m, "imagenet_r": 0.2 + 0.1 * s, "imagenet_a": 0.1}
        final = {f"eval.zeroshot.{d}.top1": v for d, v in top1.items()}
        final["eval.zeroshot.ood_mean.top1"] = (top1["imagenet_r"] + top1["imagenet_a"]) / 2
        final.update({f"eval.retrieval.coco.{d}_r{k}": 0.1 * k / 10 + 0.01 * s for d in ("t2i", "i2t")
                      for k in (1, 5, 10)})
        finish(run, final, 1000 if m == 0 else 90000, record_tags=i % 2 == 0)
    header, rows = tbl.method_table(sweep, "idood")
    assert header == ["method", "seeds", "trainable params", "imagenet (ID) top1", "imagenet_a (OOD) top1",
                      "imagenet_r (OOD) top1", "OOD mean top1"]
    # adapter, seeds 0..2: imagenet 50/60/70 -> 60.0 ± 10.0; OOD mean (20+10)/2, (30+10)/2, (40+10)/2
    assert rows[0] == ["adapter", "3", "1,000", "60.0 ± 10.0", "10.0 ± 0.0", "30.0 ± 10.0", "20.0 ± 5.0"]
    assert rows[1][:4] == ["full", "2 of 3 done", "90,000", "75.0 ± 7.1"]
    header, rows = tbl.method_table(sweep, "retrieval")
    assert header[3:] == ["T→I R@1", "T→I R@5", "T→I R@10", "I→T R@1", "I→T R@5", "I→T R@10"]
    assert rows[0][3] == "2.0 ± 1.0" and rows[0][8] == "11.0 ± 1.0"
    header, _ = tbl.method_table(sweep, "methods", metrics=["eval.zeroshot.*"])
    assert header[3:] == ["zeroshot imagenet top1 (id)", "zeroshot imagenet_a top1 (ood)",
                          "zeroshot imagenet_r top1 (ood)", "zeroshot ood_mean top1"]
    out = dodo("table", str(sweep.path), "--layout", "idood", cwd=tmp_path).stdout
    assert "| adapter | 3 | 1,000 | 60.0 ± 10.0 |" in out and (sweep.path / "table_idood.csv").exists()
    assert "trainable params" in dodo("table", str(sweep.path), cwd=tmp_path).stdout  # the points layout


def test_in_training_retrieval_keys_and_named_points(tmp_path: Path):
    sweep, _ = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.seed=0,1"], None,
                             ["lora: model.adapter.kind=lora"])
    for s, run in enumerate(sweep.runs()):
        final = {f"eval.{split}.{d}_r{k}": 0.5 + 0.1 * s for split in ("id", "ood") for d in ("ir", "tr")
                 for k in (1, 5, 10)}
        final.update({"eval.id.r_mean": 0.5, "eval.ood.r_mean": 0.25 + 0.05 * s})
        finish(run, final, 10, record_tags=False)
    header, rows = tbl.method_table(sweep, "retrieval", dataset="id")
    assert header[3:6] == ["T→I R@1", "T→I R@5", "T→I R@10"] and rows == [
        ["lora", "2", "10"] + ["55.0 ± 7.1"] * 6]
    header, rows = tbl.method_table(sweep, "idood", metric="r_mean")
    assert header[3:] == ["ID r_mean", "OOD r_mean"] and rows[0][3:] == ["50.0 ± 0.0", "27.5 ± 3.5"]
    with pytest.raises(FileNotFoundError, match="no run .* has metrics for --layout idood --metric top5"):
        tbl.method_table(sweep, "idood", metric="top5")


def test_rows_group_over_any_seed_key(tmp_path: Path):
    """Without dropout train.seed changes nothing; model.init_seed (random-init towers) and
    data.seed (data order) are seeds too: points that differ only in them share a row."""
    sweep, _ = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["model.init_seed=0,1", "data.seed=5,6"], None,
                             ["a: train.lr=1e-3", "b: train.lr=2e-3"])
    for i, run in enumerate(sweep.runs()):
        finish(run, {"eval.loss": float(i)}, 10, record_tags=False)
    header, rows = tbl.method_table(sweep, "methods")
    assert [r[:2] for r in rows] == [["a", "4"], ["b", "4"]] and header[3:] == ["eval.loss"]
    assert rows[0][3] == "1.5 ± 1.291" and rows[1][3] == "5.5 ± 1.291"


def test_rows_are_grouped_by_values_not_by_label(tmp_path: Path):
    """Two keys that both end in `.dropout` must not merge two methods into one row."""
    sweep, _ = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["train.seed=0,1"], None,
                             ["model.adapter.dropout=0.1", "model.adapter.lora.dropout=0.1"])
    for run in sweep.runs():
        finish(run, {"eval.loss": 1.0}, 10, record_tags=False)
    rows = tbl.method_table(sweep, "methods")[1]
    assert [r[:2] for r in rows] == [["adapter.dropout=0.1", "2"], ["lora.dropout=0.1", "2"]]


def test_rescored_table_reads_the_suites_rerun(tmp_path: Path):
    """`dodo eval RUN --task suites` writes eval/suites.json; `dodo table --rescored` takes its
    keys over the training-time ones where a run has it, and keeps the rest."""
    sweep, _ = sweeps.create(DEMO, [f"runs_dir={tmp_path}/runs"], ["data.seed=0,1"], None)
    for s, run in enumerate(sweep.runs()):
        finish(run, {"eval.retrieval.coco.i2t_r1": 0.9, "eval.loss": 2.0 + s}, 10, record_tags=False)
    rerun = sweep.runs()[0].path / "eval"
    rerun.mkdir()
    write_json_atomic(rerun / "suites.json", {"step": 5, "final": {"eval.retrieval.coco.i2t_r1": 0.5}})
    cols = ["eval.retrieval.coco.i2t_r1", "eval.loss"]
    assert tbl.method_table(sweep, "methods", metrics=cols)[1][0][3:] == ["2.5 ± 0.7071", "90.0 ± 0.0"]
    assert tbl.method_table(sweep, "methods", metrics=cols, rescored=True)[1][0][3:] == ["2.5 ± 0.7071", "70.0 ± 28.3"]
    out = dodo("table", str(sweep.path), "--layout", "methods", "--rescored", cwd=tmp_path).stdout
    assert "70.0 ± 28.3" in out
