"""CIFAR-10 / CIFAR-100 in their python pickle format (``cifar-10-batches-py`` / ``cifar-100-python``).

SRC is the extracted folder. CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train) and
``test_batch``, each a pickle of ``{b"data": (N, 3072) uint8, b"labels": [N ints], b"filenames":
[...]}``, class names in ``batches.meta`` (``b"label_names"``). CIFAR-100: ``train`` and ``test``
with ``b"fine_labels"`` (and ``b"coarse_labels"``), names in ``meta`` (``b"fine_label_names"``);
the 100 fine classes are the labels. A row of ``data`` is the 32x32 image channel-first: 1024
red, then 1024 green, then 1024 blue values, rows top to bottom. ``--split train|test``.
The cache is image-only with labels; class ids are the label indices.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Loaded, Source, SourceError, require_path
from dodo.data.ingest.classes import resolve_classnames

FILES: dict[str, dict[str, list[str]]] = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"train": ["train"], "test": ["test"]},
}
META: dict[str, tuple[str, bytes, bytes]] = {  # meta file, names key, labels key
    "cifar10": ("batches.meta", b"label_names", b"labels"),
    "cifar100": ("meta", b"fine_label_names", b"fine_labels"),
}


def _unpickle(path: Path) -> dict:
    # The CIFAR files are python pickles (the format's own definition; no library reads them
    # otherwise). encoding="bytes" keeps the keys bytes as in the original python-2 files.
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise SourceError(f"{path} is not a CIFAR python pickle ({err})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a CIFAR batch (a pickled dict)")
    return data


def to_image(row: np.ndarray) -> np.ndarray:
    """One (3072,) uint8 CIFAR row -> (32, 32, 3) uint8 (channel-first planes to HWC)."""
    return np.ascontiguousarray(row.reshape(3, 32, 32).transpose(1, 2, 0))


class CifarSource(Source):
    kind = "cifar"
    modality = "image"

    def _variant(self, root: Path) -> str:
        if (root / "batches.meta").exists():
            return "cifar10"
        if (root / "meta").exists():
            return "cifar100"
        raise SourceError(f"{root} is not an extracted CIFAR folder: it has neither batches.meta "
                          "(cifar-10-batches-py) nor meta (cifar-100-python)")

    def items(self) -> list[Item]:
        root = require_path(self.src, "CIFAR folder", want_dir=True)
        if self.split not in ("train", "test"):
            raise SourceError(f"--from cifar needs --split train or test (got {self.split!r})")
        variant = self._variant(root)
        meta_file, names_key, labels_key = META[variant]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(root / meta_file)[names_key]]
        self.dataset = self.dataset or variant
        self.class_ids = [str(i) for i in range(len(names))]
        self.classnames = (resolve_classnames(self.classnames_file, self.class_ids)
                           if self.classnames_file else [n.replace("_", " ") for n in names])
        self.has_labels = True
        items = []
        for name in FILES[variant][self.split]:
            path = require_path(str(root / name), f"CIFAR {self.split} batch")
            batch = _unpickle(path)
            try:
                data, labels = np.asarray(batch[b"data"], np.uint8), list(batch[labels_key])
            except KeyError as err:
                raise SourceError(f"{path} has no {err.args[0]!r}; not a {variant} batch") from None
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise SourceError(f"{path}: data is {data.shape}, labels {len(labels)}; expected (N, 3072) and N")
            files = batch.get(b"filenames", [])
            for i, (row, label) in enumerate(zip(data, labels)):
                where = f"{path}[{i}]" + (f" ({files[i].decode()})" if i < len(files) else "")
                items.append(Item(f"{name}-{i:05d}", where, (row.tobytes(), int(label))))
        return items

    def load(self, item: Item) -> Loaded:
        pixels, label = item.payload
        return Loaded(to_image(np.frombuffer(pixels, np.uint8)), [], label)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split}
