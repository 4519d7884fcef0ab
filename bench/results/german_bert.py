"""A pretrained German BERT for the language adapter (docs/results.md, seed 001), made offline.

No German BERT can be downloaded here, so this script makes a tiny one the way such models are
made: a cased WordPiece vocabulary trained with the `tokenizers` library on German text, and a
transformers `BertForMaskedLM` pretrained by masked language modelling (15% of the tokens,
transformers' own DataCollatorForLanguageModeling: 80% [MASK], 10% random, 10% kept) on the
German captions of the training scans (bench/results/german.py). `save_pretrained` writes
the model and its tokenizer to one folder, which `model.lang_adapter.encoder_path` loads as a
researcher loads a local bert-base-german-cased (AutoModel -> BertModel; the MLM head is unused).

dodo's own MLM (the CLIP family's masked-adapter pretext) trains adapters inside a CLIP text
tower, not a standalone HF BertModel, hence this script. It uses a plain PyTorch loop rather
than transformers' Trainer: a few thousand tiny steps need no Trainer machinery (accelerate,
checkpoint folders, logging integrations), and the loop keeps the run deterministic and short.

    python bench/results/german_bert.py OUT/bert_de OUT/text_de/corpus.txt OUT/text_de/val.txt \
        --extra OUT/templates_de.txt OUT/classnames_de.txt      # about 2 min on 2 CPU cores

Prints held-out (val captions) masked-token accuracy before and after; writes it to
OUT/bert_de/mlm_eval.json. `--steps 0 --tokenizer OUT/bert_de` saves the same BERT with the same
vocabulary, untrained (the control row of docs/results.md: does the adapter build on the MLM
pretraining?).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: list[str], vocab_size: int) -> BertTokenizerFast:
    """A cased WordPiece vocabulary (German nouns are capitalised; umlauts kept)."""
    wp = BertWordPieceTokenizer(lowercase=False, strip_accents=False, clean_text=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS)
    # The trainer breaks ties between equally frequent merges differently run to run (so two runs
    # may split a rare word differently); the vocabulary is saved with the model, and the ids are
    # fixed here (specials first, then sorted). A control BERT reuses it: --tokenizer.
    vocab = SPECIALS + sorted(set(wp.get_vocab()) - set(SPECIALS))
    # transformers 5 builds the fast tokenizer from the vocabulary itself (as tests/test_lang_adapter.py).
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False, strip_accents=False)


@torch.no_grad()
def masked_accuracy(model: BertForMaskedLM, batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of masked positions (labels != -100) whose argmax prediction is the original token."""
    model.eval()
    right = total = 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        at = b["labels"] != -100
        right += int((logits.argmax(-1)[at] == b["labels"][at]).sum())
        total += int(at.sum())
    model.train()
    return right / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("corpus", type=Path, help="German training text, one sentence a line")
    ap.add_argument("val", type=Path, help="German held-out text, one sentence a line")
    ap.add_argument("--extra", type=Path, nargs="*", default=[],
                    help="more German text for the vocabulary only (templates, class names)")
    ap.add_argument("--vocab", type=int, default=400)
    ap.add_argument("--tokenizer", type=Path, default=None, help="reuse this folder's tokenizer instead of training one")
    ap.add_argument("--steps", type=int, default=2000, help="MLM steps; 0 = save the random-init BERT (a control)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} exists; delete it to pretrain again")
        return

    torch.manual_seed(args.seed)
    train = [s for s in args.corpus.read_text(encoding="utf-8").splitlines() if s]
    val = [s for s in args.val.read_text(encoding="utf-8").splitlines() if s]
    extra = [s.replace("{}", " ") for p in args.extra for s in p.read_text(encoding="utf-8").splitlines() if s]
    tok = (BertTokenizerFast.from_pretrained(args.tokenizer, local_files_only=True) if args.tokenizer
           else train_tokenizer(train + extra, args.vocab))
    # Tiny BERT: 2 layers of width 64 (the captions are short, 32 positions are plenty).
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=256, max_position_embeddings=64))
    collate = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
    enc = lambda texts: [tok(t, truncation=True, max_length=32) for t in texts]  # noqa: E731
    train_enc, val_enc = enc(train), enc(val)
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 2)  # the collator masks with torch's global RNG: a fixed held-out masking
    val_batches = [collate(val_enc[i:i + 256]) for i in range(0, len(val_enc), 256)]
    before = masked_accuracy(model, val_batches)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(args.steps, 1), pct_start=0.05)
    started = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):  # --steps 0: the same BERT left at its random init (a control)
        idx = torch.randint(len(train_enc), (args.batch,), generator=gen)
        batch = collate([train_enc[i] for i in idx])  # input_ids / attention_mask / labels (B, T)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == 1:
            print(f"step {step:5d}  mlm loss {loss.item():.4f}", flush=True)
    after = masked_accuracy(model, val_batches)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    report = {"vocab": len(tok), "parameters": sum(p.numel() for p in model.bert.parameters()),
              "steps": args.steps, "batch": args.batch, "val_masked_accuracy_before": before,
              "val_masked_accuracy_after": after, "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "mlm_eval.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
