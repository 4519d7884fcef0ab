"""Prompt learning's keys of ``model:``: ``model.clip`` (the frozen CLIP towers, the CLIP family's
ClipConfig; its loss / objective keys are unused) and ``model.prompt`` (the learned prompts, the
few-shot draw and the base-to-new split), plus the submit-time data checks.

Torch-free, and config-level (the config layer imports no data module: tests/test_models_family.py
"layers depend one way"): the checks read manifest.json as JSON (dodo.data.manifest.Manifest's
fields) and the shards' ``labels`` arrays with h5py / zarr (dodo/data/store.py's layout), never
an image; dodo.data.fewshot.class_counts is the data layer's reader of the same counts (tested equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from dodo.adapters.config import AdapterConfig
from dodo.config.errors import ConfigValueError, check
from dodo.models.clip.config import CLIP_BASE_KEYS, ClipConfig
from dodo.models.config import ModelConfig

SHOTS = (1, 2, 4, 8, 16)  # CoOp's few-shot settings (others are allowed: any K >= 1)


@dataclass
class PromptConfig:
    # coop: [V1..VM][CLASS] (Zhou et al.); structured: [general][domain (class)][instance] prompts,
    # the instance prompt from visual-guided attention over the image's patch tokens (docs/methods.md).
    method: Literal["coop", "structured"] = "coop"
    # --- CoOp
    n_ctx: int = 16  # M context vectors (CoOp: 16 or 4); ctx_init overrides it with its token count
    ctx_init: str = ""  # "" = random N(0, init_std); else a phrase ("a photo of a") embedded by CLIP's token embedding
    csc: bool = False  # class-specific contexts (one set per class) instead of one unified set
    class_token_position: Literal["end", "middle", "front"] = "end"
    init_std: float = 0.02
    suffix: str = "."  # text after the class name (CLIP's "a photo of a {}." ends with a full stop)
    # --- structured prompts: token counts of the three parts
    n_general: int = 4  # shared by every class (initialised like CoOp's context: ctx_init / random)
    n_domain: int = 4  # one set per class (random N(0, init_std))
    n_instance: int = 4  # queries of the visual-guided attention, one instance token each
    instance_heads: int = 4  # heads of that attention (over the vision tower's width)
    # concat: [G][D_c][I(x)][CLASS]; add: [G + I_G(x)][D_c + I_D(x)][CLASS] (n_instance must then
    # equal n_general + n_domain: instance token j is added to context token j, as CoCoOp adds
    # its meta-net token to every context vector).
    instance_mode: Literal["concat", "add"] = "concat"
    # --- few-shot data and the seen / unseen split
    shots: int = 16  # K images per (base) class drawn from data.train_cache
    shot_seed: int = 1  # the draw depends on this and the labels only (not on the world size)
    classnames: str = ""  # "" = the train cache manifest's; or clip_benchmark:<dataset> / a file
    # Base (seen) classes: trained on, scored as base_top1; the rest are new (unseen), scored as
    # new_top1 with their own names. [] = the first half (ceil(C / 2)), as CoCoOp's split.
    base_classes: list[int] = field(default_factory=list)
    base_to_new: bool = True  # false: train and score on every class (no new_top1)

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_general", "n_domain", "n_instance", "instance_heads", "shots"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        check(len(set(self.base_classes)) == len(self.base_classes) and all(c >= 0 for c in self.base_classes),
              "base_classes", f"must be distinct class indices >= 0, got {self.base_classes}")
        check(self.method != "structured" or self.instance_mode == "concat"
              or self.n_instance == self.n_general + self.n_domain, "n_instance",
              f"is {self.n_instance}, but instance_mode=add adds instance token j to context token j: set "
              f"n_instance={self.n_general + self.n_domain} (n_general + n_domain) or instance_mode=concat")
        check(self.method != "structured" or self.class_token_position == "end", "class_token_position",
              f"is {self.class_token_position}; structured prompts put the class name at the end: set end")


def _no_adapter() -> AdapterConfig:
    return AdapterConfig(kind="none")


@dataclass
class PromptModelConfig(ModelConfig):
    """A frozen CLIP (transformers CLIPModel) whose text prompts are learned."""

    family: str = "prompt"
    adapter: AdapterConfig = field(default_factory=_no_adapter)  # none: only the prompts train
    clip: ClipConfig = field(default_factory=ClipConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def frozen_base(self) -> dict[str, object]:
        keys = super().frozen_base()
        keys.update({f"model.clip.{k}": getattr(self.clip, k) for k in CLIP_BASE_KEYS})
        return keys


REFUSED_ADAPTERS = {k: "prompt learning trains the prompts only; the CLIP towers stay frozen"
                    for k in ("bottleneck", "lora", "prefix", "mam", "film", "r_adapter")}


def base_split(n_classes: int, base_classes: Sequence[int], base_to_new: bool = True) -> tuple[list[int], list[int]]:
    """(base, new) class indices: ``base_classes`` or the first half (ceil(C / 2), CoCoOp's
    base-to-new split); new = the rest (none when ``base_to_new`` is false: all classes are base)."""
    if not base_to_new:
        return list(range(n_classes)), []
    base = sorted(base_classes) if base_classes else list(range((n_classes + 1) // 2))
    return base, [c for c in range(n_classes) if c not in set(base)]


def _manifest(path: str) -> Optional[dict]:
    """manifest.json of a cache as a dict, None when absent or unreadable (the cache check names it)."""
    try:
        return json.loads((Path(path).expanduser() / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def label_counts(path: str, m: dict) -> list[int]:
    """Images per class: the shards' ``labels`` arrays (one row per image, -1 = none) counted."""
    counts: dict[int, int] = {}
    for shard in m.get("shards", []):
        file = Path(path).expanduser() / "shards" / shard["name"]
        if m.get("store") == "zarr":
            import zarr
            group = zarr.open_group(str(file), mode="r")
            labels = group["labels"][:] if "labels" in group else []
        else:
            import h5py
            with h5py.File(file, "r", locking=False) as f:
                labels = f["labels"][:] if "labels" in f else []
        for y in labels.tolist() if hasattr(labels, "tolist") else labels:
            if y >= 0:
                counts[y] = counts.get(y, 0) + 1
    n = max(len(m.get("classnames") or m.get("class_ids") or []), max(counts, default=-1) + 1)
    return [counts.get(c, 0) for c in range(n)]


def _names(p: PromptConfig, m: dict) -> tuple[Optional[list[str]], str]:
    """(class names, problem): the manifest's, or a file's lines (``model.prompt.classnames``);
    None for clip_benchmark lists, which the run resolves (dodo.eval.classnames)."""
    if not p.classnames:
        return list(m.get("classnames") or []), ""
    if p.classnames.startswith("clip_benchmark"):
        return None, ""
    file = Path(p.classnames).expanduser()
    if not file.is_file():
        return None, f"{p.classnames!r} is neither clip_benchmark:<dataset> nor a file"
    text = file.read_text(encoding="utf-8")
    names = json.loads(text) if text.lstrip().startswith("[") else [l.strip() for l in text.splitlines() if l.strip()]
    return [str(n) for n in names], ""


def check_fewshot_data(train_cache: str, eval_cache: str, p: PromptConfig, global_batch: int) -> Optional[tuple[str, str]]:
    """None, or (key, message) for the first problem a prompt-learning run would hit: a cache
    without labels or class names (or with index-only names), base classes outside it, a class
    with fewer images than ``p.shots`` (named, with its count), a few-shot set smaller than one
    global batch, or an eval cache with other classes."""
    m = _manifest(train_cache)
    if m is None:
        return None
    fix = "build a labelled cache with class names (dodo data cache SRC --from folder|cifar, docs/data.md)"
    if not m.get("has_labels"):
        return "data.train_cache", f"{train_cache} has no labels, but prompt learning trains a classifier; {fix}"
    names, problem = _names(p, m)
    if problem:
        return "model.prompt.classnames", problem
    if names is not None and not names:
        return "data.train_cache", (f"{train_cache} has no class names, but prompts are built from them; set "
                                    "model.prompt.classnames to clip_benchmark:<dataset> or a file, or " + fix)
    if not p.classnames and names and all(n.strip().isdigit() for n in names):  # e.g. webdataset .cls labels
        return "model.prompt.classnames", (f"is unset and {train_cache} names its classes only by index "
                                          f"({', '.join(names[:3])}, ...), but prompts are built from class "
                                          "names; set model.prompt.classnames to clip_benchmark:<dataset> or a "
                                          "file with one name per line")
    counts = label_counts(train_cache, m)
    if names is not None and len(names) != len(counts):
        return "model.prompt.classnames", (f"gives {len(names)} class names, but {train_cache} has "
                                          f"{len(counts)} classes; name the list that matches the cache")
    outside = [c for c in p.base_classes if c >= len(counts)]
    if outside:
        return "model.prompt.base_classes", f"has class {outside[0]}, but {train_cache} has {len(counts)} classes"
    base, _ = base_split(len(counts), p.base_classes, p.base_to_new)
    short = [c for c in base if counts[c] < p.shots]
    if short:
        c = short[0]
        named = f" ({names[c]!r})" if names else ""
        return "model.prompt.shots", (f"is {p.shots}, but class {c}{named} of {train_cache} has only {counts[c]} "
                                      f"images; lower model.prompt.shots to {min(counts[b] for b in base)} or drop "
                                      "that class from model.prompt.base_classes")
    if p.shots * len(base) < global_batch:
        return "train.micro_batch", (f"gives a global batch of {global_batch}, more than the {p.shots * len(base)} "
                                     f"few-shot images ({p.shots} shots x {len(base)} classes); lower "
                                     "train.micro_batch (or grad_accum) to fit")
    e = _manifest(eval_cache) if eval_cache else None
    if e is not None:
        if not e.get("has_labels"):
            return "data.eval_cache", f"{eval_cache} has no labels; prompt learning scores classes: {fix}"
        n_eval = len(e.get("classnames") or e.get("class_ids") or [])
        if n_eval and n_eval != len(counts):
            return "data.eval_cache", (f"{eval_cache} has {n_eval} classes but {train_cache} has {len(counts)}; "
                                       "use the test split of the same dataset")
    return None


def validate_job(job) -> None:  # JobConfig -> None (ConfigValueError with the full key path)
    """Prompt learning needs a labelled cache with class names, enough images per base class for
    model.prompt.shots, and a few-shot set no smaller than one global batch. The data checks run
    when the cache exists (a placeholder path in a dry run is reported by the cache check)."""
    m, d = job.model, job.data
    check(d.image_size == m.clip.image_size or bool(m.clip.path), "data.image_size",
          f"is {d.image_size}, but model.clip.image_size={m.clip.image_size}; set both to the same value")
    check(d.max_caption_tokens <= m.clip.max_text_len, "data.max_caption_tokens",
          f"is {d.max_caption_tokens}, more than model.clip.max_text_len={m.clip.max_text_len}")
    check(not d.synthetic_on_first_use, "data.synthetic_on_first_use",
          "is true, but the synthetic shapes have no labels to learn prompts for: set it to false and "
          "data.train_cache to a labelled cache")
    check(d.kind != "synthetic", "data.kind",
          "is synthetic, but prompt learning classifies labelled images: set data.kind=hdf5 (or zarr) and "
          "data.train_cache to a labelled cache (dodo data cache SRC --from folder|cifar, docs/data.md)")
    check(bool(d.eval_cache), "data.eval_cache",
          "is empty, which would hold out the train cache's last samples (whole classes, in a class-ordered "
          "cache); prompt learning scores every class's held-out images: set data.eval_cache to the "
          "val / test split")
    problem = check_fewshot_data(d.train_cache, d.eval_cache, m.prompt, job.train.micro_batch * job.train.grad_accum
                                 * job.cluster.world_size)
    if problem is not None:
        raise ConfigValueError(*problem)
