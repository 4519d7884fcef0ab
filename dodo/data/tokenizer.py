"""Tokenizers: the committed word-level one for the synthetic captions, or a local one.

``load_tokenizer("builtin:synthetic")`` loads ``dodo/assets/synthetic_tokenizer.json``, a
word-level tokenizer over the synthetic caption vocabulary. Any other spec is a local path
(a tokenizer directory or a ``tokenizer.json``); nothing is ever downloaded.

Regenerate the asset (deterministic, vocabulary in sorted order) with::

    python -m dodo.data.tokenizer --rebuild
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast


BUILTIN_SYNTHETIC = "builtin:synthetic"
EOS_TOKEN = "<|endoftext|>"  # EOS and PAD, as in GPT-2
IMAGE_TOKEN = "<|image|>"  # marks where the image prefix goes
UNK_TOKEN = "<unk>"
# Fixed ids at the front of the vocabulary; caption words follow in sorted order.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IMAGE_TOKEN, UNK_TOKEN)
ASSET_NAME = "synthetic_tokenizer.json"


def asset_path() -> Path:
    """Where the committed synthetic tokenizer lives inside the installed package."""
    return Path(str(importlib.resources.files("dodo") / "assets" / ASSET_NAME))


def word_level_tokenizer(texts: Iterable[str], specials: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A WordLevel tokenizer over the lowercased words of ``texts``. Deterministic: ``specials``
    take ids 0.., then the words in sorted order."""
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {token: i for i, token in enumerate(specials)}
    for word in sorted(words - set(specials)):
        vocab[word] = len(vocab)

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    # No decoder: decoding joins words with single spaces, which is exactly the caption form.
    # Registering the specials keeps "<|image|>" whole and lets decode skip them.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tokenizer


def build_synthetic_tokenizer(captions: Optional[Sequence[str]] = None) -> Tokenizer:
    """`word_level_tokenizer` over ``captions`` (default: every synthetic caption)."""
    if captions is None:  # imported here: a run on real data never imports the generator
        from dodo.data.synthetic import all_captions
        captions = all_captions()
    return word_level_tokenizer(captions)


def rebuild(out: Path) -> Path:
    """Write the synthetic tokenizer to ``out`` (a tokenizer.json file); returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    build_synthetic_tokenizer().save(str(out), pretty=True)
    return out


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load ``builtin:synthetic`` or a local tokenizer directory / tokenizer.json, offline.

    The result always has an EOS token, a pad token (= EOS when it had none) and ``<|image|>``.
    Tokens added here get ids past the base vocabulary, so the model must size its embedding
    table from ``len(tokenizer)``, not ``tokenizer.vocab_size``.
    """
    path = asset_path() if spec == BUILTIN_SYNTHETIC else Path(os.path.expanduser(spec))
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path {spec} not found; set model.tokenizer to a local tokenizer "
            f"directory or {BUILTIN_SYNTHETIC}")
    if path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    return _ensure_special_tokens(tokenizer)


def _ensure_special_tokens(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give the tokenizer the specials dodo relies on: EOS, PAD (= EOS) and ``<|image|>``."""
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token is None:
        # A bare tokenizer.json carries no role names; GPT-2-style files use <|endoftext|>.
        if EOS_TOKEN not in vocab:
            tokenizer.add_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)],
                                 special_tokens=True)
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.unk_token is None and UNK_TOKEN in vocab:
        tokenizer.unk_token = UNK_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Added when missing, and registered as special either way so decode can skip it.
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]},
        replace_extra_special_tokens=False)
    tokenizer.padding_side = "right"
    return tokenizer


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dodo.data.tokenizer",
        description="Regenerate the committed synthetic-caption tokenizer asset.")
    parser.add_argument("--rebuild", action="store_true",
                        help="write the tokenizer built from the synthetic captions")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output file (default: the package asset {ASSET_NAME})")
    args = parser.parse_args(argv)
    if not args.rebuild:
        parser.print_help()
        return 2
    out = rebuild(args.out if args.out is not None else asset_path())
    vocab_size = build_synthetic_tokenizer().get_vocab_size()
    print(f"wrote {out} ({vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
