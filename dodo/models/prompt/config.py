"""Prompt learning's keys of ``model:``: ``model.clip`` (the frozen CLIP towers, the CLIP family's
ClipConfig; its loss / objective keys are unused) and ``model.prompt`` (the learned prompts, the
few-shot draw and the base-to-new split), plus the submit-time data checks.

Torch-free: the checks read the cache manifests and the shards' label arrays only (h5py / zarr
through dodo.data.fewshot), never torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    if not (Path(d.train_cache).expanduser() / "manifest.json").exists():
        return
    from dodo.data.fewshot import check_fewshot_data

    problem = check_fewshot_data(d.train_cache, d.eval_cache, m.prompt, job.train.micro_batch * job.train.grad_accum
                                 * job.cluster.world_size)
    if problem is not None:
        raise ConfigValueError(*problem)
