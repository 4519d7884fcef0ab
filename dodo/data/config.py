"""Data config. The embedded default is the synthetic shapes dataset, generated in memory.

``kind: hdf5`` / ``kind: zarr`` read a shard cache built by ``dodo data cache`` (docs/data.md):
``train_cache`` names it, ``eval_cache`` the held-out one ("" holds out the last ``num_eval``
samples of ``train_cache``). With ``synthetic_on_first_use`` a missing cache is built from the
synthetic generator (``num_train`` / ``num_eval`` / ``image_size`` / ``seed``) the first time a
run needs it. For a cache of real data, ``num_train`` is ignored: the whole cache is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dodo.config.errors import check


@dataclass
class DataConfig:
    kind: Literal["synthetic", "hdf5", "zarr"] = "synthetic"
    seed: int = 1234
    num_train: int = 20000
    num_eval: int = 256
    image_size: int = 32
    max_caption_tokens: int = 16
    num_workers: int = 0
    # Batches each DataLoader worker keeps queued (torch's prefetch_factor; 0 = torch's default).
    prefetch_factor: int = 2
    # JPEG decoder for jpeg caches (dodo/data/decode.py): auto = simplejpeg / PyTurboJPEG when
    # installed, else PIL with draft-mode DCT downscaling (pil_draft); pil = plain PIL.
    decoder: Literal["auto", "pil", "pil_draft", "simplejpeg", "turbojpeg"] = "auto"
    # hdf5 / zarr: cache directories (relative paths: from where `dodo submit` ran)
    train_cache: str = ""
    eval_cache: str = ""
    synthetic_on_first_use: bool = False
    encode: Literal["jpeg", "raw"] = "raw"  # how synthetic_on_first_use stores images
    samples_per_shard: int = 5000  # ... and how many per shard
    # Shard checks when a run opens a cache: "checksum" reads every shard once (sha256);
    # "size" only compares sizes (for multi-TB caches: run `dodo data verify` once instead).
    verify: Literal["checksum", "size", "none"] = "checksum"
    # Sampler: the epoch order shuffles blocks of `shuffle_block` consecutive samples, then
    # samples within windows of `shuffle_window` blocks, so each batch reads few shard regions.
    # shuffle_block=1 is a plain uniform permutation.
    shuffle_block: int = 256
    shuffle_window: int = 8

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "image_size", "max_caption_tokens",
                     "samples_per_shard", "shuffle_block", "shuffle_window"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.prefetch_factor >= 0, "prefetch_factor", f"must be >= 0, got {self.prefetch_factor}")
        if self.decoder not in ("auto", "pil", "pil_draft"):
            from dodo.data.decode import available  # torch-free; the decoder must be importable
            check(self.decoder in available(), "decoder",
                  f"{self.decoder} is not installed here (installed: {', '.join(available())}); "
                  "pip install it or set data.decoder=auto")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.kind != "synthetic":
            check(bool(self.train_cache), "train_cache",
                  f"data.kind={self.kind} reads a shard cache: set data.train_cache to its folder "
                  "(build one with `dodo data cache`, or set data.synthetic_on_first_use=true)")
