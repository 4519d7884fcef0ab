"""A word-level tokenizer.json (the `tokenizers` library) for the results runs: every word of
the training captions, the class names and the zero-shot template, with the special tokens
dodo's tasks use (<|endoftext|> = EOS / PAD, <unk> = the mask token of masked modelling).

    python bench/results/tokenizer.py OUT/tokenizer.json CORPUS.txt [MORE.txt ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from dodo.data.tokenizer import SPECIAL_TOKENS, word_level_tokenizer

EXTRA = "a photo of a zero one two three four five six seven eight nine ."


def build(out: Path, texts: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    word_level_tokenizer([*texts, EXTRA], [*SPECIAL_TOKENS, "<mask>"]).save(str(out))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), [line for p in sys.argv[2:] for line in Path(p).read_text().splitlines()])
