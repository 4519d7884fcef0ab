"""bench/results' German digits data and German BERT (docs/results.md, seed 001, language adapter).

The German captions are translation pairs of digits.py's English ones (same attributes, correct
feminine agreement), the class-names file follows the class folders' label order, the German
outputs leave the English ones untouched, and german_bert.py writes a BERT folder that
AutoModel / AutoTokenizer load with every German word in its vocabulary."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "results"


def _script(name: str):
    """bench/results/<name>.py as a module, without putting bench/results on sys.path (its
    tokenizer.py would shadow any `import tokenizer` of later tests)."""
    spec = importlib.util.spec_from_file_location(f"bench_results_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits, german = _script("digits"), _script("german")

ATTRS = [{"weight": w, "size": s, "slant": sl} for w in ("thick", "thin") for s in ("tall", "short")
         for sl in ("leaning to the right", "leaning to the left")]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_de")
    labels = [i % 10 for i in range(30)]
    split = {i: ("train" if i < 20 else "val" if i < 25 else "test") for i in range(30)}
    german.write(out, labels, [ATTRS[i % len(ATTRS)] for i in range(30)], split, digits.NAMES, digits._captions)
    return out


def test_german_captions_agree_and_pair_with_the_english(written: Path) -> None:
    assert german.captions_de(7, ATTRS[0])[0] == "Eine dicke handgeschriebene Sieben, die nach rechts geneigt ist"
    assert german.captions_de(1, ATTRS[7])[1] == "Die Zahl 1, von Hand mit dünnen Strichen geschrieben"
    assert german.captions_de(0, ATTRS[1])[3] == "Eine große und dicke Ziffer Null"
    pairs = [json.loads(line) for line in (written / "parallel" / "train_en_de.jsonl").read_text().splitlines()]
    assert len(pairs) == 20 * 5
    for p in pairs:  # each German caption names the English caption's digit and attributes
        en, de = p["src"].lower(), p["tgt"]
        digit = next(d for d, n in enumerate(digits.NAMES) if f" {n} " in f" {en.rstrip('.')} " or f" {d} " in en)
        assert german.NAMES_DE[digit] in de or f" {digit}," in de, p
        for eng, ger in german.SLANT.items():
            assert (eng in en) == (ger in de), p
        assert ("thick" in en) == any(w in de for w in ("dicke", "dicken")), p
        assert de[0].isupper() and de.endswith(".") and p["src"].endswith(".")
    corpus = (written / "text_de" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    assert corpus == [p["tgt"] for p in pairs]  # the train scans only
    test = json.loads((written / "captions_de" / "dataset_digits.json").read_text(encoding="utf-8"))
    assert [im["imgid"] for im in test["images"]] == list(range(25, 30))
    assert all(len(im["sentences"]) == 5 and im["filename"] == f"digit_{im['imgid']:04d}.png" for im in test["images"])


def test_class_names_follow_the_folder_labels_and_templates_the_english(written: Path) -> None:
    names = (written / "classnames_de.txt").read_text(encoding="utf-8").split()
    english = sorted(digits.NAMES)  # a class-folder cache labels its folders in sorted order
    assert names == [german.NAMES_DE[digits.NAMES.index(n)] for n in english]
    assert names[:2] == ["Acht", "Fünf"]
    templates = (written / "templates_de.txt").read_text(encoding="utf-8").splitlines()
    assert len(templates) == len((BENCH / "templates.txt").read_text().splitlines())
    assert all(t.count("{}") == 1 for t in templates)


@pytest.mark.slow
def test_german_bert_folder_loads_and_covers_the_german_words(written: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "bert_de"
    proc = subprocess.run([sys.executable, str(BENCH / "german_bert.py"), str(out),
                           str(written / "text_de" / "corpus.txt"), str(written / "text_de" / "val.txt"),
                           "--extra", str(written / "templates_de.txt"), str(written / "classnames_de.txt"),
                           "--steps", "30", "--batch", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "mlm_eval.json").read_text())
    assert report["steps"] == 30 and 0 <= report["val_masked_accuracy_after"] <= 1
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    texts = (written / "text_de" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    texts += [t.format(n) for t in (written / "templates_de.txt").read_text(encoding="utf-8").splitlines()
              for n in (written / "classnames_de.txt").read_text(encoding="utf-8").split()]
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)  # cased German words, umlauts kept
    assert "Fünf" in tok.tokenize("Eine handgeschriebene Fünf.")
    model = AutoModel.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 64
