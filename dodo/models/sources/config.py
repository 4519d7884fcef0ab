"""Where a tower's weights come from (torch-free: it runs at submit time).

    source:
      kind: open_clip          # hf | open_clip | timm | random
      path: /models/clip/RN50x16.pt
      arch: RN50x16            # open_clip model name / timm model name; hf: read from config.json
      dtype: auto              # auto | float32 | bfloat16 | float16 (auto: bf16 on sm_80+, fp16 on sm_70, fp32 on CPU)
      tower: vision            # vision | text | full | lm | encoder (what to build of the checkpoint)
      grid: true               # vision: return the token grid (RN: attention pool removed; ViT: no CLS)
      arch_kwargs: '{}'        # JSON object: overrides of the named architecture (tiny test configs)

`check_source` does the checks that need no torch: the path exists and has the format its kind
reads, the architecture name is one the library knows, ``arch_kwargs`` is a JSON object. The
shape check (every tensor of the checkpoint against the architecture) runs at load, in
dodo.models.sources.load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional

from dodo.config.errors import ConfigError, check
from dodo.config.preflight import MUST_EXIST

KINDS = ("hf", "open_clip", "timm", "random")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


@dataclass
class SourceConfig:
    kind: Literal["hf", "open_clip", "timm", "random"] = "random"
    path: str = field(default="", metadata=MUST_EXIST)  # hf: a directory; open_clip / timm: a file
    arch: str = ""  # open_clip: "RN50x16", "ViT-B-16"; timm: "vit_base_patch16_224.dino"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tower: Literal["vision", "text", "full", "lm", "encoder"] = "vision"
    grid: bool = True  # vision towers: token grid (B, N, C) instead of the pooled embedding
    quick_gelu: Optional[bool] = None  # open_clip: None = True for OpenAI TorchScript .pt files
    arch_kwargs: str = "{}"  # JSON object of architecture overrides (tiny configs, custom sizes)

    def __post_init__(self) -> None:
        check(self.kind == "random" or bool(self.path), "path",
              f"source kind {self.kind} reads local weights: set path to a local "
              + ("directory" if self.kind == "hf" else "checkpoint file"))
        check(self.kind not in ("open_clip", "timm") or bool(self.arch), "arch",
              f"source kind {self.kind} needs the architecture name (e.g. "
              + ("RN50x16, ViT-B-16" if self.kind == "open_clip" else "vit_base_patch16_224.dino") + ")")
        try:
            kwargs = json.loads(self.arch_kwargs)
        except json.JSONDecodeError as err:
            kwargs = err
        check(isinstance(kwargs, dict), "arch_kwargs",
              f"must be a JSON object such as '{{\"width\": 64}}', got {self.arch_kwargs!r}")

    def kwargs(self) -> dict[str, Any]:
        return json.loads(self.arch_kwargs)


def sniff_format(path: str) -> str:
    """'safetensors' | 'zip' (torch.save / TorchScript) | 'pickle' (legacy torch.save) | 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in (2, 3, 4, 5):
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _package_dir(name: str) -> Optional[Path]:
    spec = importlib.util.find_spec(name)  # locates the package without importing it (no torch)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def open_clip_archs() -> tuple[str, ...]:
    """open_clip's model names: the JSON configs it ships (read, not imported)."""
    root = _package_dir("open_clip")
    return tuple(sorted(p.stem for p in (root / "model_configs").glob("*.json"))) if root else ()


@lru_cache(maxsize=1)
def timm_archs() -> tuple[str, ...]:
    """timm's model names: the functions its model files register (read, not imported)."""
    root = _package_dir("timm")
    names: set[str] = set()
    for p in sorted((root / "models").glob("*.py")) if root else []:
        names.update(re.findall(r"@register_model\s*\n\s*def\s+(\w+)\s*\(", p.read_text(errors="replace")))
    return tuple(sorted(names))


def _unknown_arch(key: str, arch: str, known: tuple[str, ...], lib: str) -> ConfigError:
    import difflib
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; {lib} knows {len(known)} names"
    return ConfigError(f"{key}.arch={arch!r} is not an architecture {lib} knows{hint}")


def check_source(cfg: SourceConfig, key: str = "source", paths: bool = True) -> None:
    """Submit-time checks (no torch): existence, format and architecture name. Raises ConfigError.
    ``paths=False``: the architecture name only (a job with placeholder paths still dry-runs;
    the submit-time MUST_EXIST check reports a missing path)."""
    if cfg.kind == "random":
        return
    if not paths:
        if cfg.kind == "open_clip" and open_clip_archs() and cfg.arch not in open_clip_archs():
            raise _unknown_arch(key, cfg.arch, open_clip_archs(), "open_clip")
        if cfg.kind == "timm" and timm_archs() and cfg.arch.split(".", 1)[0] not in timm_archs():
            raise _unknown_arch(key, cfg.arch.split(".", 1)[0], timm_archs(), "timm")
        return
    path = cfg.path
    if not os.path.exists(path):
        raise ConfigError(f"{key}.path={path!r} does not exist; point it at a local copy of the weights "
                          "(nothing is downloaded at run time)")
    if cfg.kind == "hf":
        if not os.path.isdir(path):
            raise ConfigError(f"{key}.path={path!r} is a file, but source kind hf reads a Hugging Face model "
                              "directory (config.json + weights, as save_pretrained writes it)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}.path={path!r} has no config.json: not a Hugging Face model directory")
        if not any(os.path.isfile(os.path.join(path, w)) for w in HF_WEIGHTS):
            raise ConfigError(f"{key}.path={path!r} holds no weights ({', '.join(HF_WEIGHTS)})")
        return
    if os.path.isdir(path):
        raise ConfigError(f"{key}.path={path!r} is a directory; source kind {cfg.kind} reads one "
                          f"checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    fmt = sniff_format(path)
    suffix = Path(path).suffix
    if suffix not in CHECKPOINT_SUFFIXES or fmt == "unknown" or (suffix == ".safetensors") != (fmt == "safetensors"):
        raise ConfigError(f"{key}.path={path!r} is not a checkpoint file: expected a torch.save / TorchScript "
                          f".pt/.pth/.bin or a .safetensors file, found {fmt} data with suffix {suffix or '(none)'}")
    if cfg.kind == "open_clip":
        known = open_clip_archs()
        if not known:
            raise ConfigError("source kind open_clip needs the open_clip_torch package; run `make install`")
        if cfg.arch not in known:
            raise _unknown_arch(key, cfg.arch, known, "open_clip")
    else:
        known = timm_archs()
        if not known:
            raise ConfigError("source kind timm needs the timm package; run `make install`")
        if cfg.arch.split(".", 1)[0] not in known:  # the ".dino" / ".mae" tag is checked at load
            raise _unknown_arch(key, cfg.arch.split(".", 1)[0], known, "timm")


# An LM's embedding may be padded beyond its tokenizer's vocabulary for speed (GPT-J: 50400 rows
# for 50257 tokens); more padding than this means tokenizer and LM do not belong together.
MAX_EMBED_PADDING = 256
ADDED_TOKENS_SLACK = 8  # tokens dodo / a method adds (EOS, pad, MAGMA's <|image|>): resized at build


def check_tokenizer_vocab(tokenizer_size: int, embed_rows: int, key: str = "model.tokenizer") -> None:
    """The tokenizer's ids must index the LM's embedding: size <= rows (+ a few added tokens,
    resized later) and rows - size < MAX_EMBED_PADDING. Raises ConfigError (one line)."""
    if tokenizer_size > embed_rows + ADDED_TOKENS_SLACK or embed_rows - tokenizer_size >= MAX_EMBED_PADDING:
        raise ConfigError(f"{key}: the tokenizer has {tokenizer_size} tokens but the LM's embedding has "
                          f"{embed_rows} rows; they are not a pair: use the LM's own tokenizer")


def tokenizer_size(spec: str) -> Optional[int]:
    """Tokens of a tokenizer (builtin:synthetic, a tokenizer.json or a tokenizer directory) read
    without torch; None when the files are not ones this knows (the load-time check still runs)."""
    if spec == "builtin:synthetic":
        path = Path(__file__).resolve().parents[2] / "assets" / "synthetic_tokenizer.json"
    else:
        path = Path(os.path.expanduser(spec))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer  # Rust, no torch
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    if path.is_dir() and (path / "vocab.json").is_file():  # GPT-2 style BPE files
        n = len(json.loads((path / "vocab.json").read_text()))
        added = path / "added_tokens.json"
        return n + (len(json.loads(added.read_text())) if added.is_file() else 0)
    if path.is_dir() and (path / "vocab.txt").is_file():  # BERT WordPiece
        return sum(1 for line in (path / "vocab.txt").read_text(encoding="utf-8").splitlines() if line)
    return None


def hf_vocab_size(path: str) -> Optional[int]:
    """config.json's vocab_size of a Hugging Face model directory (no torch)."""
    try:
        value = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None
