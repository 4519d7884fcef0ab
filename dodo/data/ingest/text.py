"""A text-only source (BookCorpus, Wikipedia dumps, any corpus): plain ``.txt`` or ``.jsonl``.

SRC is a file, a folder (every ``*.txt`` / ``*.jsonl`` in it, sorted) or a glob. A ``.txt``
contributes each non-empty line; a ``.jsonl`` each record's ``text`` field. The cache is
text-only (modality ``text``: no images; a sample's image is None).

- ``--block 0`` (default): one sample per line / record (whitespace collapsed).
- ``--block N --tokenizer SPEC``: the lines are tokenised (no special tokens) and concatenated
  in order, then cut into blocks of exactly N tokens; the last partial block is dropped, as
  Hugging Face's ``run_mlm.py`` ``group_texts`` does. Each block is stored as its token ids
  (``tokens``) and its decoded text (the caption). Tokenising happens while listing, in the
  main process (a fast tokenizer does ~1M lines a minute per core), so the block boundaries are
  fixed before shards are cut and a resumed build makes the same blocks.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from dodo.data.ingest import Item, Loaded, Source, SourceError
from dodo.data.ingest.images import BadSample

SUFFIXES: tuple[str, ...] = (".txt", ".jsonl")
TOKENIZE_BATCH = 4096  # lines per call of the fast tokenizer


class TextSource(Source):
    kind = "text"
    modality = "text"

    def files(self) -> list[Path]:
        path = Path(self.src).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(self.src)))
        if not found:
            raise SourceError(f"no text files at {self.src}; give a .txt / .jsonl file, a folder of "
                              "them or a glob such as 'books/*.txt'")
        bad = [p for p in found if p.suffix.lower() not in SUFFIXES]
        if bad:
            raise SourceError(f"{bad[0]} is neither .txt nor .jsonl")
        return found

    def lines(self) -> Iterator[tuple[str, str]]:
        """(where, text) of every non-empty line / record, in order."""
        for path in self.files():
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if path.suffix.lower() == ".jsonl":
                        try:
                            record = json.loads(line)
                            text = record["text"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise SourceError(f"{path}:{n} is not a JSON object with a 'text' "
                                              "field") from None
                        if not isinstance(text, str):
                            continue
                    else:
                        text = line
                    yield f"{path}:{n}", text

    def items(self) -> list[Item]:
        if self.block:
            return self._blocks()
        return [Item(f"{i:09d}", where, text.encode("utf-8", "surrogateescape"))
                for i, (where, text) in enumerate(self.lines())]

    def _blocks(self) -> list[Item]:
        from dodo.data.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(self.tokenizer)
        except (FileNotFoundError, OSError, ValueError) as err:
            raise SourceError(f"--tokenizer {self.tokenizer}: {err}") from None
        stream: list[np.ndarray] = []
        pending: list[str] = []
        first_where = ""

        def flush() -> None:
            ids = tok(pending, add_special_tokens=False)["input_ids"]
            stream.extend(np.asarray(i, np.int32) for i in ids)
            pending.clear()

        for where, text in self.lines():
            first_where = first_where or where
            pending.append(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            if len(pending) >= TOKENIZE_BATCH:
                flush()
        if pending:
            flush()
        ids = np.concatenate(stream) if stream else np.zeros(0, np.int32)
        n = len(ids) // self.block
        if n == 0:
            raise SourceError(f"{self.src} has {len(ids)} tokens, fewer than one --block of {self.block}")
        blocks = ids[:n * self.block].reshape(n, self.block)  # (n, block) int32
        return [Item(f"{i:09d}", f"{self.src} tokens [{i * self.block}, {(i + 1) * self.block})",
                     blocks[i].tobytes()) for i in range(n)]

    def load(self, item: Item) -> Loaded:
        if not self.block:
            return Loaded(None, [item.payload])
        ids = np.frombuffer(item.payload, np.int32)
        if not hasattr(self, "_tok"):
            from dodo.data.tokenizer import load_tokenizer
            self._tok = load_tokenizer(self.tokenizer)
        text = self._tok.decode(ids.tolist())
        if not text.strip():
            raise BadSample("empty caption", "the block decodes to whitespace only")
        return Loaded(None, [text], -1, [ids.tolist()])

    def describe(self) -> dict:
        return {**super().describe(), "block": self.block, "tokenizer": self.tokenizer}
