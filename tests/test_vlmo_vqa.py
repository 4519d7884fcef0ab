"""VQA v2 and NLVR2 for VLMo: the official files (written here with json and PIL) -> caches ->
question / statement datasets -> the vqa / nlvr2 stages through `dodo submit` on 2 ranks.

Covers the answer normaliser and soft scores against hand-computed values, the answer
vocabulary shared by train and eval, test-dev without answers, bad input (missing annotation
file, missing images skipped and reported), and the submit-time refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import dodo, run_dirs
from data_helpers import make_cache, write_word_tokenizer
from dodo.data.ingest import SourceError
from dodo.data.ingest.vqa_answers import (answer_counts, best_possible, normalize_answer, official_accuracy,
                                          score_vector, soft_score, vocabulary)
from vqa_data import all_texts, scene, write_nlvr2, write_vqa


# ---------------------------------------------------------------- answers: normaliser and scores


@pytest.mark.parametrize("raw, norm", [
    ("Red.", "red"), ("two", "2"), ("None", "0"), ("the dog", "dog"), ("A Cat", "cat"), ("t-shirt", "t shirt"),
    ("yes!", "yes"), ("dont know", "don't know"), ("1,000", "1000"), ("3.5", "3.5"), ("5.", "5"),
    ("on the table.", "on table"), ("  white\tand blue ", "white and blue"), ("an apple, a pear", "apple pear"),
])
def test_normalize_answer_follows_the_official_rules(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_soft_scores_by_hand() -> None:
    counts = answer_counts(["red"] * 7 + ["Red."] * 2 + ["dark red"])
    assert counts == {"red": 9, "dark red": 1}
    assert answer_counts(["two"] * 5 + ["2"] * 4 + ["3"]) == {"2": 9, "3": 1}
    assert [soft_score(n) for n in (0, 1, 2, 3, 7)] == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0]
    # the official metric, leave-one-annotator-out over 10: 3 of 10 -> (3 x 2/3 + 7 x 1) / 10 = 0.9
    assert [official_accuracy(n) for n in range(6)] == pytest.approx([0, 0.3, 0.6, 0.9, 1.0, 1.0])
    index = {"red": 0, "blue": 1, "dark red": 2}
    assert score_vector({"red": 9, "dark red": 1}, index, 3, official=True) == pytest.approx([1.0, 0, 0.3])
    assert score_vector({"red": 9, "dark red": 1, "maroon": 2}, index, 3) == [1.0, 0.0, pytest.approx(1 / 3)]
    # vocabulary: majority answers with >= min_count occurrences, most frequent first, ties a-z
    assert vocabulary(["no", "No", "two", "2", "red", "blue", "Blue"], 2) == ["2", "blue", "no"]
    # the oracle within {"red"}: 1 on the first question, 1/3 on the second ("red" once), 0 on the third
    assert best_possible([{"red": 4}, {"red": 1, "pink": 9}, {"pink": 3}], {"red": 0}) == pytest.approx((1 + 1 / 3) / 3)


# ---------------------------------------------------------------- the stages' model


def test_finetune_stages_start_from_earlier_weights_and_train_their_head() -> None:
    import torch
    import torch.nn.functional as F

    from dodo.adapters.config import AdapterConfig
    from dodo.models import build_model
    from dodo.models.registry import InitState
    from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig
    from dodo.models.vlmo.heads import vqa_loss

    def build(weights=None, **kw):
        torch.manual_seed(kw.pop("seed", 0))
        cfg = VlmoModelConfig(adapter=AdapterConfig(kind="none"),
                              vlmo=VlmoConfig(hidden=32, layers=2, heads=4, vlffn_start=1, **kw))
        return build_model(cfg, 40, 1, 2, InitState(weights=weights))

    earlier = build(stage="vl", mlm_weight=1.0, seed=1).state_dict()
    g = torch.Generator().manual_seed(0)
    images, images_2 = torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, 3, 32, 32, generator=g)
    ids, mask = torch.randint(3, 40, (3, 6), generator=g), torch.ones(3, 6, dtype=torch.long)
    for stage, kw in (("vqa", {"vqa_answers": 5}), ("nlvr2", {"nlvr2": True})):
        m = build(dict(earlier), stage=stage, **kw)
        assert "blocks.0.attn.q_proj.weight" in m.loaded and "itm_pooler.weight" in m.loaded
        assert not any(k.startswith(("vqa_head", "nlvr2_head")) for k in m.loaded)  # new heads start fresh
        assert torch.equal(m.state_dict()["blocks.1.experts.vl.fc1.weight"], earlier["blocks.1.experts.vl.fc1.weight"])
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert "blocks.0.attn.q_proj.weight" in trainable and "itm_pooler.weight" in trainable
        assert not trainable & {"itc_image.weight", "itm_head.weight", "logit_scale"}  # unused: not decayed
        if stage == "vqa":
            scores = torch.tensor([[1.0, 1 / 3, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 2 / 3, 0]])
            loss = m(images=images, input_ids=ids, attention_mask=mask, vqa_scores=scores)
            assert torch.allclose(loss, vqa_loss(m.vqa_logits(images, ids, mask), scores))
        else:
            labels = torch.tensor([1, 0, 1])
            loss = m(images=images, images_2=images_2, input_ids=ids, attention_mask=mask, labels=labels)
            assert torch.allclose(loss, F.cross_entropy(m.nlvr2_logits(images, images_2, ids, mask), labels))
        loss.backward()
        assert {n for n, p in m.named_parameters() if p.grad is not None} == trainable


def test_the_new_head_gets_its_own_learning_rate() -> None:
    """VLMo's lr_mult (20 for VQA): the head's parameters in a group at train.lr x head_lr_mult."""
    from types import SimpleNamespace

    import torch

    from dodo.adapters.config import AdapterConfig
    from dodo.distributed.engine import param_groups
    from dodo.models import build_model
    from dodo.models.registry import InitState
    from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig

    torch.manual_seed(0)
    cfg = VlmoModelConfig(adapter=AdapterConfig(kind="none"), vlmo=VlmoConfig(
        hidden=32, layers=2, heads=4, vlffn_start=1, stage="vqa", vqa_answers=4, head_lr_mult=20.0))
    m = build_model(cfg, 40, 1, 2, InitState())
    groups = param_groups(m, SimpleNamespace(train=SimpleNamespace(lr=1e-3)))
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(2e-2)]
    head = {id(p) for p in m.vqa_head.parameters()}
    assert {id(p) for p in groups[1]["params"]} == head
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_finetuning_at_a_larger_image_size_resizes_the_positions() -> None:
    """VLMo fine-tunes VQA at 480 px from 224 px pretraining: the position grid is resized."""
    import torch

    from dodo.adapters.config import AdapterConfig
    from dodo.models import build_model
    from dodo.models.registry import InitState
    from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig
    from dodo.models.vlmo.pretrain import resize_positions

    # a ramp over the columns (value = column centre in [0, 1]) stays a ramp inside the new grid
    old = torch.linspace(1 / 8, 7 / 8, 4)  # centres of 4 columns
    pos = torch.cat([torch.full((1, 1, 2), -1.0), old.repeat(4).view(1, 16, 1).expand(1, 16, 2)], dim=1)
    out = resize_positions(pos, 64)  # 4 x 4 -> 8 x 8
    assert out.shape == (1, 65, 2) and torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:, 0].view(8, 8)
    assert torch.allclose(grid, grid[:1].expand(8, 8))  # still constant down the columns
    cols = grid[0]  # increasing, symmetric about 0.5 (bicubic with clamped borders: not exactly linear)
    assert (cols.diff() > 0).all() and torch.allclose(cols + cols.flip(0), torch.ones(8), atol=1e-5)
    assert abs(float(cols[0]) - 1 / 8) < 0.05 and abs(float(cols[3]) - 7 / 16) < 0.03

    def build(size: int, weights=None, **kw):
        torch.manual_seed(0)
        cfg = VlmoModelConfig(adapter=AdapterConfig(kind="none"),
                              vlmo=VlmoConfig(hidden=32, layers=2, heads=4, vlffn_start=1, image_size=size, **kw))
        return build_model(cfg, 40, 1, 2, InitState(weights=weights))

    earlier = build(32, stage="vl").state_dict()  # 4 x 4 patches of 8 px
    m = build(48, dict(earlier), stage="vqa", vqa_answers=3)  # 6 x 6
    assert "image_pos" in m.loaded and m.image_pos.shape == (1, 37, 32)
    torch.testing.assert_close(m.image_pos.detach(), resize_positions(earlier["image_pos"], 36))


# ---------------------------------------------------------------- caches


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The official files and their caches (32 px), built once for this module."""
    root = tmp_path_factory.mktemp("vqa")
    out = {"root": root}
    out["vqa_train_q"] = write_vqa(root / "vqa", "train2014", list(range(16)), missing=(3,))
    out["vqa_val_q"] = write_vqa(root / "vqa", "val2014", list(range(16, 24)))
    out["vqa_test_q"] = write_vqa(root / "vqa", "test-dev2015", list(range(24, 26)), annotations=False)
    out["nlvr2_train_f"] = write_nlvr2(root / "nlvr2", "train", 8, missing=("train-101-0-img1",))
    out["nlvr2_dev_f"] = write_nlvr2(root / "nlvr2", "dev", 4, offset=20)
    out["vqa_train"] = make_cache(out["vqa_train_q"], "vqa", root / "c" / "vqa_train", min_count=1)
    out["vqa_val"] = make_cache(out["vqa_val_q"], "vqa", root / "c" / "vqa_val", min_count=1)
    out["vqa_test"] = make_cache(out["vqa_test_q"], "vqa", root / "c" / "vqa_test")
    out["nlvr2_train"] = make_cache(out["nlvr2_train_f"], "nlvr2", root / "c" / "nlvr2_train")
    out["nlvr2_dev"] = make_cache(out["nlvr2_dev_f"], "nlvr2", root / "c" / "nlvr2_dev")
    out["tokenizer"] = write_word_tokenizer(root / "tok" / "tokenizer.json", all_texts())
    return out


def _bad(cache: Path) -> list[dict]:
    return [json.loads(l) for l in (cache / "bad_samples.jsonl").read_text().splitlines()]


def test_vqa_cache_round_trip(data) -> None:
    from dodo.data.finetune import VqaQuestions
    from dodo.data.manifest import describe

    m = describe(data["vqa_train"])
    # each image once (16 written, image 3 missing), the 48 questions in the table beside the shards
    assert (m.modality, m.num_images, m.dataset, m.split) == ("image", 15, "vqav2", "train")
    assert m.source["kind"] == "vqa" and m.source["questions"] == 48 and m.source["annotated"]
    assert [b["key"] for b in _bad(data["vqa_train"])] == ["COCO_train2014_000000001003"]
    train = VqaQuestions(data["vqa_train"])
    assert len(train) == 45 and train.dropped == 3  # image 3's questions are left out
    # majority answers seen >= 1 time (also those of image 3's questions), most frequent first:
    # "no" / "yes" 8x each, then the colours and counts (as digits: "two" and "2" are one answer)
    assert train.answers[:2] == ["no", "yes"]
    assert set(train.answers[2:]) == {"red", "blue", "green", "yellow", "1", "2", "3"}
    assert m.source["answers"] == len(train.answers)

    val = VqaQuestions(data["vqa_val"], train.answers)  # held out: scored on the TRAINING vocabulary
    color, obj, count = scene(16)
    q0, q1, q2 = val[0], val[1], val[2]
    assert q0.text == f"What color is the {obj}?" and q0.image.shape == (32, 32, 3) and q0.kind == "other"
    assert q0.scores[train.answers.index(color)] == 1.0 and q0.scores.sum() == 1.0  # "dark red" not in the vocabulary
    assert q1.scores[train.answers.index(str(count))] == 1.0  # "two" x5 + "2" x4 -> "2": 9 annotators
    if str(count + 1) in train.answers:  # one annotator said count + 1
        assert q1.scores[train.answers.index(str(count + 1))] == pytest.approx(1 / 3)
        assert q1.official[train.answers.index(str(count + 1))] == pytest.approx(0.3)
    assert q2.text == f"Is there a {obj} in the image?"  # picture 16 (even) shows it: 9 x "yes", 1 x "no"
    assert q2.scores[train.answers.index("yes")] == 1.0 and q2.scores[train.answers.index("no")] == pytest.approx(1 / 3)
    assert val.ceiling() == pytest.approx(1.0)
    vlmo_targets = VqaQuestions(data["vqa_val"], train.answers, targets="official")  # as VLMo's code trains
    assert np.array_equal(vlmo_targets[1].scores, q1.official) and np.array_equal(vlmo_targets[1].soft, q1.scores)
    assert q0.image.std() > 5  # a picture, not a blank


def test_vqa_train_and_val_in_one_cache(data, tmp_path: Path) -> None:
    """VLMo trains for test-dev on train + val: a comma list of question files, one vocabulary."""
    from dodo.data.finetune import VqaQuestions
    from dodo.data.manifest import describe

    both = make_cache(f"{data['vqa_train_q']},{data['vqa_val_q']}", "vqa", tmp_path / "trainval", min_count=1)
    m = describe(both)
    assert m.split == "train,val" and m.num_images == 15 + 8 and m.source["questions"] == 72
    ds = VqaQuestions(both)
    assert len(ds) == 69 and {ds[0].image.shape, ds[len(ds) - 1].image.shape} == {(32, 32, 3)}


def test_an_interrupted_vqa_build_resumes_with_its_table(data, tmp_path: Path) -> None:
    """The table is written with the manifest (last): a build stopped before it finishes the
    missing shards on a rerun and writes the same table."""
    from dodo.data.cache import CacheOptions, build_cache

    opts = dict(source="vqa", src=str(data["vqa_val_q"]), out=str(tmp_path / "c"), image_size=32,
                samples_per_shard=3, min_count=1)
    build_cache(CacheOptions(**opts), log=lambda m: None)
    table = (tmp_path / "c" / "questions.json").read_text()
    for name in ("manifest.json", "questions.json", "shards/shard-00002.h5", "shards/shard-00002.h5.done.json"):
        (tmp_path / "c" / name).unlink()  # as if killed while writing the third shard
    lines: list[str] = []
    build_cache(CacheOptions(**opts), log=lines.append)
    assert any("2 finished shards kept" in line for line in lines), lines
    assert (tmp_path / "c" / "questions.json").read_text() == table


def test_vqa_test_dev_caches_without_answers(data) -> None:
    from dodo.data.finetune import VqaQuestions
    from dodo.data.manifest import describe

    m = describe(data["vqa_test"])
    assert not m.source["annotated"] and m.source["answers"] == 0 and m.split == "test-dev"
    test = VqaQuestions(data["vqa_test"], ["no", "red"])
    assert len(test) == 6 and test[0].scores is None and test[0].text.endswith("?")


def test_nlvr2_cache_round_trip(data) -> None:
    from dodo.data.finetune import Nlvr2Statements
    from dodo.data.manifest import describe

    m = describe(data["nlvr2_train"])
    assert (m.modality, m.num_images, m.dataset, m.split) == ("image", 15, "nlvr2", "train")
    assert m.source["statements"] == 24 and m.source["labelled"]
    assert [b["key"] for b in _bad(data["nlvr2_train"])] == ["train-101-0-img1"]
    ds = Nlvr2Statements(data["nlvr2_train"])
    assert len(ds) == 21 and ds.dropped == 3  # the pair missing its right image
    s = ds[0]
    assert s.text.startswith("The left image contains exactly") and s.label in (0, 1)
    assert s.image.shape == s.image_2.shape == (32, 32, 3) and not np.array_equal(s.image, s.image_2)
    labels = [ds[i].label for i in range(len(ds))]
    assert 0 < sum(labels) < len(labels)  # both answers occur
    assert Nlvr2Statements(data["nlvr2_dev"]).statements[0]["identifier"] == "dev-100-0-0"


def test_bad_layouts_are_one_line_errors(data, tmp_path: Path) -> None:
    from dodo.data.cache import CacheOptions, build_cache

    lonely = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    lonely.write_text(data["vqa_val_q"].read_text())  # no annotations file beside it
    with pytest.raises(SourceError, match="v2_mscoco_val2014_annotations.json"):
        build_cache(CacheOptions(source="vqa", src=str(lonely), out=str(tmp_path / "c")), log=lambda m: None)
    assert not (tmp_path / "c").exists()  # nothing written
    proc = dodo("data", "cache", str(lonely), "--from", "vqa", "--out", str(tmp_path / "c2"), cwd=tmp_path,
                check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "annotations" in proc.stderr
    notjson = tmp_path / "dev.json"
    notjson.write_text('{"sentence": "no identifier"}\n')
    with pytest.raises(SourceError, match="dev.json:1 is not an NLVR2 record"):
        build_cache(CacheOptions(source="nlvr2", src=str(notjson), out=str(tmp_path / "c3")), log=lambda m: None)


# ---------------------------------------------------------------- submit-time checks


def _submit(workdir: Path, job: str, *args: str, check: bool = True):
    return dodo("submit", f"jobs/{job}.yaml", *args, cwd=workdir, check=check, timeout=600)


def test_submit_refuses_wrong_data_and_heads(data, workdir: Path) -> None:
    tok = f"model.tokenizer={data['tokenizer']}"
    vqa = [tok, f"data.train_cache={data['vqa_train']}", f"data.eval_cache={data['vqa_val']}", "data.image_size=32"]
    cases = [
        ("vlmo_vqa", [*vqa, "model.vlmo.vqa_answers=7"], "model.vlmo.vqa_answers"),
        ("vlmo_vqa", [tok, f"data.train_cache={data['nlvr2_train']}", f"data.eval_cache={data['vqa_val']}"],
         "data.train_cache"),
        ("vlmo_vqa", [tok, f"data.train_cache={data['vqa_train']}", f"data.eval_cache={data['vqa_test']}"],
         "data.eval_cache"),
        ("vlmo_nlvr2", [tok, f"data.train_cache={data['nlvr2_train']}", f"data.eval_cache={data['nlvr2_dev']}",
                        "model.vlmo.nlvr2=false"], "model.vlmo.nlvr2"),
        ("vlmo_nlvr2", [tok, f"data.train_cache={data['nlvr2_train']}", f"data.eval_cache={data['nlvr2_dev']}",
                        f"model.vlmo.predict_cache={data['vqa_test']}"], "model.vlmo.predict_cache"),
        ("vlmo_vqa", [*vqa[:3], "data.image_size=64", "model.vlmo.image_size=64"], "data.train_cache"),
    ]
    for job, args, key in cases:
        proc = _submit(workdir, job, *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dodo: error:"), proc.stderr
        assert key in lines[0], lines[0]
    assert not (workdir / "runs").exists()
    # vqa_answers: 0 takes the training cache's count; the dry run shows it resolved
    out = _submit(workdir, "vlmo_vqa", *vqa, "--dry-run").stdout
    n = json.loads((data["vqa_train"] / "manifest.json").read_text())["source"]["answers"]
    assert f"vqa_answers: {n}" in out


# ---------------------------------------------------------------- end to end, 2 ranks


SHORT = ["train.steps=6", "train.micro_batch=8", "train.warmup_steps=1", "train.log_every=1", "train.save_every=6",
         "train.eval_every=1000", "data.image_size=32", "data.verify=size"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_vqa_then_nlvr2_on_two_ranks(data, workdir: Path) -> None:
    tok = f"model.tokenizer={data['tokenizer']}"
    _submit(workdir, "vlmo_vqa", *SHORT, tok, f"data.train_cache={data['vqa_train']}",
            f"data.eval_cache={data['vqa_val']}", f"model.vlmo.predict_cache={data['vqa_test']}",
            "model.vlmo.head_lr_mult=20")  # two optimizer param groups under ZeRO-2
    (vqa_run,) = run_dirs(workdir / "runs", "vlmo_vqa")
    s = json.loads((vqa_run / "summary.json").read_text())
    final = s["final"]
    assert 0 <= final["eval.vqa_score"] <= 1 and final["eval.loss"] > 0
    assert {"eval.vqa_score.yes_no", "eval.vqa_score.number", "eval.vqa_score.other"} <= set(final)
    assert 0 <= final["eval.vqa_accuracy"] <= final["eval.vqa_score"] + 1e-9  # official <= min(1, n / 3)
    assert final["eval.vqa_ceiling"] == pytest.approx(1.0)
    # test-dev (no answers): the answers in the evaluation server's format
    dodo("eval", str(vqa_run), "--task", "predict", cwd=workdir)
    rows = json.loads((vqa_run / "eval" / "vqa_predictions.json").read_text())
    test_ids = [q["question_id"] for q in json.loads((data["vqa_test"] / "questions.json").read_text())["questions"]]
    answers = json.loads((data["vqa_train"] / "questions.json").read_text())["answers"]
    assert [r["question_id"] for r in rows] == test_ids and all(r["answer"] in answers for r in rows)
    # NLVR2 starts from the VQA run's weights (init_from): the shared transformer, not its VQA head
    _submit(workdir, "vlmo_nlvr2", *SHORT, tok, f"data.train_cache={data['nlvr2_train']}",
            f"data.eval_cache={data['nlvr2_dev']}", f"model.vlmo.init_from={vqa_run}")
    (nlvr2_run,) = run_dirs(workdir / "runs", "vlmo_nlvr2")
    final = json.loads((nlvr2_run / "summary.json").read_text())["final"]
    assert 0 <= final["eval.nlvr2_accuracy"] <= 1 and final["eval.loss"] > 0
