"""The language adapter's keys of ``model:`` (torch-free; read at submit).

``model.clip`` is the frozen CLIP (its vision tower for evaluation, its English text tower the
teacher; the keys of dodo/models/clip/config.py, a local ``path`` or a random tiny one);
``model.lang_adapter`` the frozen target-language encoder (a local Hugging Face BERT-like
directory) and the trainable adapter after it; ``model.tokenizer`` is CLIP's (English) tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dodo.adapters.config import AdapterConfig
from dodo.config.errors import check
from dodo.config.preflight import MUST_EXIST
from dodo.models.clip.config import ClipConfig
from dodo.models.config import ModelConfig


@dataclass
class LangAdapterConfig:
    # A local HF encoder directory (BertModel / any AutoModel with last_hidden_state), frozen.
    encoder_path: str = field(default="", metadata=MUST_EXIST)
    tokenizer: str = field(default="", metadata=MUST_EXIST)  # target-language tokenizer; "" = encoder_path's
    max_tokens: int = 32  # target-language tokens per text, [CLS] and [SEP] included
    # The adapter: down (encoder width -> hidden), `layers` pre-norm transformer layers, pool,
    # up (hidden -> CLIP's projection_dim, the space CLIP's text features live in).
    hidden: int = 256
    layers: int = 1
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    pool: Literal["mean", "cls"] = "mean"  # over the target-language tokens (mask-aware) or the first token
    # Distance to the teacher's (CLIP text tower's) features of the English side: mse on the
    # raw projected features (as Multilingual-CLIP), or cosine (1 - cos).
    loss: Literal["mse", "cosine"] = "mse"

    def __post_init__(self) -> None:
        for name in ("max_tokens", "hidden", "heads", "ffn_mult"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.layers in (1, 2), "layers", f"is {self.layers}; the adapter has 1 or 2 transformer layers")
        check(self.hidden % self.heads == 0, "hidden", f"{self.hidden} must be divisible by heads={self.heads}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class LangAdapterModelConfig(ModelConfig):
    """A frozen target-language encoder + a trainable adapter into frozen CLIP's text space."""

    family: str = "lang_adapter"
    # The language adapter is the trainable part: no adapters inside the frozen towers.
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(kind="none"))
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(trainable=[]))
    lang_adapter: LangAdapterConfig = field(default_factory=LangAdapterConfig)



# Every adapter kind but none: the family's trainable part is its own adapter.
REFUSED_ADAPTERS = {k: "the language adapter after the target-language encoder is the trainable part; "
                       "set model.adapter.kind=none"
                    for k in ("bottleneck", "lora", "prefix", "mam", "film", "r_adapter")}


def validate_job(job) -> None:  # JobConfig -> None (ConfigValueError with the full key path)
    """An encoder to adapt, and parallel text to train on: a cache built ``--from parallel``."""
    check(bool(job.model.lang_adapter.encoder_path), "model.lang_adapter.encoder_path",
          "is empty; set it to a local Hugging Face directory of the target-language encoder "
          "(e.g. a Chinese or German BERT saved with save_pretrained)")
    d = job.data
    fix = ("build one from a JSONL of {\"src\": English, \"tgt\": translation} records with "
           "`dodo data cache PAIRS.jsonl --from parallel --out DIR` and set data.kind=hdf5 data.train_cache=DIR")
    check(d.kind != "synthetic" and not d.synthetic_on_first_use, "data.train_cache",
          f"model.family=lang_adapter trains on parallel text, but data.kind={d.kind} "
          f"{'(synthetic_on_first_use) ' if d.synthetic_on_first_use else ''}gives image-caption pairs; {fix}")
    for key in ("train_cache", "eval_cache"):
        path = getattr(d, key)
        manifest = Path(path).expanduser() / "manifest.json" if path else None
        if manifest is None or not manifest.exists():
            continue  # missing: named by the submit's path and cache checks
        # Read as JSON here: the config layer imports no data module (tests: layers depend one way);
        # the fields are dodo.data.manifest.Manifest's, "parallel" is dodo.data.ingest.parallel.KIND.
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a damaged manifest: named by the cache checks
        modality, kind = m.get("modality", "image_text"), (m.get("source") or {}).get("kind")
        check(modality == "text" and kind == "parallel", f"data.{key}",
              f"{path} is a {modality} cache built --from {kind}, not parallel text; {fix}")
