"""The language adapter (model.family: lang_adapter): a frozen German BERT (tiny, random, saved
with save_pretrained beside its WordPiece tokenizer) and a trainable adapter into a frozen tiny
CLIP's text space, trained on English/German sentence pairs cached --from parallel.

Reference tests: the distance losses by hand, only the adapter trains and the frozen parts stay
bit-identical, the parallel cache round-trips its pairs; submit refuses a job without parallel
data; the tiny job trains on 2 ranks, its distance falls, translation retrieval rises, and the
German zero-shot / caption-retrieval suites run through the target-language path."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import dodo, metrics, run_dirs

# English / German sentences: every subject with every scene (a natural sentence each side).
SUBJECTS = [("a man", "ein Mann"), ("a woman", "eine Frau"), ("a dog", "ein Hund"), ("a cat", "eine Katze"),
            ("a child", "ein Kind"), ("a horse", "ein Pferd"), ("a bird", "ein Vogel"),
            ("an old man", "ein alter Mann")]
SCENES = [("is walking on the beach", "läuft am Strand"), ("is sitting in the park", "sitzt im Park"),
          ("is standing on a city street", "steht auf einer Straße in der Stadt"),
          ("is running across a grassy field", "rennt über eine Wiese"),
          ("is sleeping under a tree", "schläft unter einem Baum"), ("is playing in the snow", "spielt im Schnee"),
          ("is waiting at the train station", "wartet am Bahnhof"), ("is swimming in the lake", "schwimmt im See")]
# CIFAR-10's classes in German, and German prompt templates (the zero-shot suite's files).
CIFAR_DE = ["Flugzeug", "Auto", "Vogel", "Katze", "Hirsch", "Hund", "Frosch", "Pferd", "Schiff", "Lastwagen"]
TEMPLATES_DE = ["ein Foto von einem {}.", "ein unscharfes Foto von einem {}.", "ein Bild von einem {}."]


def pairs() -> list[dict[str, str]]:
    out = [{"src": f"{se} {ve}", "tgt": f"{sg} {vg}"} for se, sg in SUBJECTS for ve, vg in SCENES]
    random.Random(0).shuffle(out)  # held-out pairs: unseen combinations of seen words
    return out


def write_bert(root: Path, texts: list[str]) -> Path:
    """A tiny random BertModel and its WordPiece tokenizer (every word of ``texts``, lower-cased,
    plus the CJK characters of clip_benchmark's Chinese ImageNet templates), save_pretrained."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from dodo.eval.classnames import templates

    words = sorted({w for t in texts for w in t.lower().replace(".", " . ").split()})
    from dodo.eval.classnames import classnames

    cn_text = templates("clip_benchmark_cn:imagenet1k") + classnames("clip_benchmark_cn:imagenet1k")[:4]
    cjk = sorted({ch for t in cn_text for ch in t if ord(ch) > 0x2E80})
    root.mkdir(parents=True)
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + cjk)
                                    + "\n", encoding="utf-8")
    vocab = (root / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, strip_accents=False)
    assert len(tok) == len(vocab)  # transformers 5 takes the vocabulary itself (vocab_file is ignored)
    tok.save_pretrained(root)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from data_helpers import make_cache, write_cifar10, write_karpathy, write_word_tokenizer

    root = tmp_path_factory.mktemp("lang")
    data = pairs()
    jsonl = root / "pairs_en_de.jsonl"
    jsonl.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in data), encoding="utf-8")
    (root / "cifar_de.txt").write_text("\n".join(CIFAR_DE) + "\n", encoding="utf-8")
    (root / "templates_de.txt").write_text("\n".join(TEMPLATES_DE) + "\n", encoding="utf-8")
    german = [p["tgt"] for p in data] + CIFAR_DE + [t.format("") for t in TEMPLATES_DE]
    # Karpathy-format images with German captions (2 each), for target-language caption retrieval.
    js, imgs = write_karpathy(root / "src_de", 20, 2, "coco", size=32)
    karpathy = json.loads(js.read_text())
    for n, sentence in enumerate(s for image in karpathy["images"] for s in image["sentences"]):
        sentence["raw"] = data[n % len(data)]["tgt"] + "."
        sentence["tokens"] = data[n % len(data)]["tgt"].lower().split()
    js.write_text(json.dumps(karpathy, ensure_ascii=False), encoding="utf-8")
    return {"pairs": make_cache(jsonl, "parallel", root / "parallel_en_de"),
            "bert": write_bert(root / "bert_de", german),
            "tokenizer": write_word_tokenizer(root / "tokenizer.json", [p["src"] for p in data]),
            "cifar": make_cache(write_cifar10(root / "src", per_batch=4, test=20), "cifar", root / "cifar_test",
                                split="test"),
            "coco_de": make_cache(js, "karpathy", root / "coco_de", images=str(imgs), split="train,restval,val,test"),
            "classnames": root / "cifar_de.txt", "templates": root / "templates_de.txt", "root": root}


def _model(world, loss: str = "mse", pool: str = "mean"):
    from dodo.config.loader import load_job
    from dodo.data.tokenizer import load_tokenizer
    from dodo.tasks import build_family_model

    cfg = load_job(str(Path(__file__).resolve().parents[1] / "jobs" / "lang_adapter.yaml"),
                   [f"model.lang_adapter.encoder_path={world['bert']}", f"model.tokenizer={world['tokenizer']}",
                    f"data.train_cache={world['pairs']}", f"model.lang_adapter.loss={loss}",
                    f"model.lang_adapter.pool={pool}"])
    torch.manual_seed(0)
    return cfg, build_family_model(cfg.model, load_tokenizer(cfg.model.tokenizer))


def test_parallel_cache_round_trips_its_pairs(world) -> None:
    from dodo.data.ingest.parallel import ParallelPairs
    from dodo.data.manifest import describe

    got = ParallelPairs(world["pairs"])
    assert len(got) == 64 and describe(world["pairs"]).modality == "text"
    want = pairs()
    assert [(got[i].src, got[i].tgt) for i in range(64)] == [(p["src"], p["tgt"]) for p in want]
    tail = ParallelPairs(world["pairs"], "none", 60)
    assert len(tail) == 4 and tail[0].tgt == want[60]["tgt"]


def test_bad_parallel_source_lines_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"src": "a dog", "tgt": "ein Hund"}\n{"src": "a cat"}\n')
    proc = dodo("data", "cache", str(bad), "--from", "parallel", "--out", str(tmp_path / "out"), cwd=tmp_path,
                check=False)
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr and "'tgt'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_distance_loss_by_hand(world, loss: str) -> None:
    cfg, model = _model(world, loss)
    from dodo.models.lang_adapter.task import ParallelCollator
    from dodo.data.ingest.parallel import ParallelPairs
    from transformers import AutoTokenizer
    from dodo.data.tokenizer import load_tokenizer

    collate = ParallelCollator(load_tokenizer(cfg.model.tokenizer), 16, AutoTokenizer.from_pretrained(world["bert"]), 32)
    ds = ParallelPairs(world["pairs"])
    batch = collate([ds[i] for i in range(6)])
    assert not (batch["tgt_ids"] == collate.tgt_tokenizer.unk_token_id).any()  # German words, not [UNK]
    model.eval()
    s = model.student(batch["tgt_ids"], batch["tgt_mask"])
    t = model.clip.get_text_features(input_ids=batch["src_ids"], attention_mask=batch["src_mask"])
    t = t if torch.is_tensor(t) else t.pooler_output
    want = ((s - t) ** 2).mean() if loss == "mse" else \
        1 - ((s / s.norm(dim=-1, keepdim=True)) * (t / t.norm(dim=-1, keepdim=True))).sum(-1).mean()
    got = model(batch["src_ids"], batch["src_mask"], batch["tgt_ids"], batch["tgt_mask"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Padding does not change a text's features (the adapter's layers and pool are mask-aware).
    one = collate([ds[0]])
    torch.testing.assert_close(model.student(one["tgt_ids"], one["tgt_mask"])[0], s[0], rtol=1e-4, atol=1e-5)


def test_chinese_class_names_and_templates_from_clip_benchmark_go_through_the_adapter(world) -> None:
    """clip_benchmark's Chinese ImageNet names and templates, tokenised by the target-language
    tokenizer (characters, as a Chinese BERT does) and embedded by the adapted path."""
    from transformers import AutoTokenizer

    from dodo.data.tokenizer import load_tokenizer
    from dodo.eval.classnames import classnames, templates
    from dodo.eval.zeroshot import class_embeddings
    from dodo.models.lang_adapter.task import ParallelCollator

    cfg, model = _model(world)
    tok = AutoTokenizer.from_pretrained(world["bert"])
    collate = ParallelCollator(load_tokenizer(cfg.model.tokenizer), 16, tok, 32)
    names, temps = classnames("clip_benchmark_cn:imagenet1k")[:4], templates("clip_benchmark_cn:imagenet1k")[:5]
    ids, mask = collate.tgt_ids([t.format(n) for t in temps for n in names])
    assert not (ids == tok.unk_token_id).any()  # every character is in the vocabulary
    model.eval()
    with torch.no_grad():
        cls = class_embeddings(lambda texts: model.encode_text(*collate.tgt_ids(texts)), names, temps)  # (4, D)
    assert cls.shape == (4, model.clip.config.projection_dim)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(4))
    assert (cls @ cls.T - torch.eye(4)).abs().max() < 0.9999  # four different class embeddings


def test_only_the_adapter_trains_and_frozen_parts_stay_bit_identical(world) -> None:
    cfg, model = _model(world, "cosine", "cls")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("down.", "layers.", "norm.", "up.")) for n in trainable), trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("encoder.") for n in frozen) and any(n.startswith("clip.text_model") for n in frozen)
    from dodo.models.lang_adapter.task import ParallelCollator
    from dodo.data.ingest.parallel import ParallelPairs
    from transformers import AutoTokenizer
    from dodo.data.tokenizer import load_tokenizer

    collate = ParallelCollator(load_tokenizer(cfg.model.tokenizer), 16, AutoTokenizer.from_pretrained(world["bert"]), 32)
    ds = ParallelPairs(world["pairs"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.encoder.training and not model.clip.training  # frozen towers: dropout off
    losses = []
    for step in range(8):
        b = collate([ds[(8 * step + i) % 48] for i in range(8)])
        loss = model(b["src_ids"], b["src_mask"], b["tgt_ids"], b["tgt_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    assert losses[-1] < losses[0], losses


def test_submit_refuses_a_language_adapter_without_parallel_data(workdir: Path, world) -> None:
    common = [f"model.lang_adapter.encoder_path={world['bert']}", f"model.tokenizer={world['tokenizer']}"]
    for bad in (["data.kind=synthetic"], [f"data.train_cache={world['cifar']}"]):
        proc = dodo("submit", "jobs/lang_adapter.yaml", *common, *bad, cwd=workdir, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("dodo: error:") and "data.train_cache" in lines[0] and "--from parallel" in lines[0]
        assert not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lang_adapter_job_trains_on_two_ranks(workdir: Path, world) -> None:
    suites = (f"eval.suites=[{{kind: zeroshot, datasets: [{{name: cifar10_de, cache: '{world['cifar']}', "
              f"classnames: '{world['classnames']}', templates: '{world['templates']}'}}]}}, "
              f"{{kind: retrieval, datasets: [{{name: coco_de, cache: '{world['coco_de']}'}}]}}]")
    dodo("submit", "jobs/lang_adapter.yaml", f"model.lang_adapter.encoder_path={world['bert']}",
         f"model.tokenizer={world['tokenizer']}", f"data.train_cache={world['pairs']}", suites,
         cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "lang_adapter")
    summary = json.loads((run / "summary.json").read_text())
    first, final = summary["initial"], summary["final"]
    assert final["eval.loss"] < 0.5 * first["eval.loss"], (first, final)
    assert final["eval.pair.r_mean"] > first["eval.pair.r_mean"] + 0.1, (first, final)
    assert 0 <= final["eval.zeroshot.cifar10_de.top1"] <= 1
    assert 0 <= final["eval.retrieval.coco_de.r_mean"] <= 1  # German captions through the adapter
    train = [r["train.loss"] for r in metrics(run) if "train.loss" in r]
    assert train[-1] < train[0]
