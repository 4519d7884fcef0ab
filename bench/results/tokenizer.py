"""A word-level tokenizer.json (the `tokenizers` library) for the results runs: every word of
the training captions, the class names and the zero-shot template, with the special tokens
dodo's tasks use (<|endoftext|> = EOS / PAD, <unk> = the mask token of masked modelling).

    python bench/results/tokenizer.py OUT/tokenizer.json CORPUS.txt [MORE.txt ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|image|>", "<unk>", "<mask>"]
EXTRA = "a photo of a zero one two three four five six seven eight nine ."


def build(out: Path, texts: list[str]) -> None:
    norm, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = {w for t in [*texts, EXTRA] for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))}
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in sorted(words - set(SPECIALS)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), [line for p in sys.argv[2:] for line in Path(p).read_text().splitlines()])
