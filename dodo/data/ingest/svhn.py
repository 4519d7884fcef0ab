"""SVHN (cropped digits, format 2) in its MATLAB files: ``train_32x32.mat``, ``test_32x32.mat``
(and ``extra_32x32.mat``).

SRC is one of those files, or the folder holding them with ``--split train|test|extra``. Each
file holds ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10, where 10 is the digit
0 (the dataset's own convention); labels become 0..9, class ids "0".."9" and class names
"zero".."nine" (clip_benchmark's SVHN names, so zero-shot prompts read "a photo of the number: "zero""). Read with scipy.io.loadmat (the files are MATLAB v5; scipy ships with
scikit-learn, already a dependency). The cache is image-only with labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dodo.data.ingest import Item, Loaded, Source, SourceError, require_path
from dodo.data.ingest.classes import resolve_classnames

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images, (N,) labels 0..9 of one SVHN file."""
    from scipy.io import loadmat
    try:
        data = loadmat(str(path))
    except (OSError, ValueError, NotImplementedError) as err:
        raise SourceError(f"{path} is not an SVHN MATLAB file ({' '.join(str(err).split())[:120]})") from None
    if "X" not in data or "y" not in data:
        raise SourceError(f"{path} has no X / y arrays; expected SVHN's format 2 (train_32x32.mat)")
    x, y = np.asarray(data["X"]), np.asarray(data["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise SourceError(f"{path}: X is {x.shape}, y has {len(y)}; expected (32, 32, 3, N) and N labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise SourceError(f"{path}: labels run {y.min()}..{y.max()}; SVHN's are 1..10 (10 = the digit 0)")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2), dtype=np.uint8), (y % 10).astype(np.int64)


class SvhnSource(Source):
    kind = "svhn"
    modality = "image"

    def items(self) -> list[Item]:
        src = Path(self.src)
        if src.is_dir():
            if self.split not in ("train", "test", "extra"):
                raise SourceError(f"--from svhn with a folder needs --split train, test or extra (got {self.split!r})")
            src = src / f"{self.split}_32x32.mat"
        path = require_path(str(src), "SVHN .mat file")
        self.split = self.split or path.stem.split("_")[0]
        self.dataset = self.dataset or "svhn"
        self.class_ids = [str(d) for d in range(10)]
        self.classnames = resolve_classnames(self.classnames_file, self.class_ids) if self.classnames_file else list(NAMES)
        self.has_labels = True
        self._images, labels = read_mat(path)
        return [Item(f"{path.stem}-{i:06d}", f"{path}[{i}]", int(label)) for i, label in enumerate(labels)]

    def load(self, item: Item) -> Loaded:
        index = int(item.key.rsplit("-", 1)[1])
        return Loaded(self._images[index], [], item.payload)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.split}
