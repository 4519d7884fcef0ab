"""VLMo's keys of ``model:``: ``model.vlmo``, the multiway transformer, its stage and its losses.

Stages (``model.vlmo.stage``; the paper's stagewise pretraining, each stage starting from the
previous one's weights through ``model.vlmo.init_from``, read by dodo/train/init_from.py):
  mim  image-only masked image modelling (BEiT-style block-wise masking, visual-token targets
       from a fixed random-projection codebook); attention + the image expert train
  mlm  text-only MLM; attention and the image expert frozen, the text expert trains
  vl   image-text ITC (+ the VL contrastive head on the top layers) + ITM with hard negatives
       + MLM; everything trains. Retrieval fine-tuning is this stage on the target data.
Fine-tuning stages (from an earlier stage's run by ``init_from``; everything trains):
  vqa    VQA v2: the answer classifier (``vqa_answers`` = the training cache's vocabulary
         size) on the fused [T_CLS], BCE on soft scores; caches built ``--from vqa``
  nlvr2  NLVR2: one statement fused with each of two images (``nlvr2: true``); caches built
         ``--from nlvr2``. Both need ``data.eval_cache`` (VQA v2 val2014 / NLVR2 dev).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dodo.config.preflight import MUST_EXIST

from dodo.config.errors import check
from dodo.models.config import ModelConfig


STAGES = ("mim", "mlm", "vl", "vqa", "nlvr2")
FINETUNE = ("vqa", "nlvr2")  # stages read from caches built --from vqa / --from nlvr2


@dataclass
class VlmoConfig:
    stage: str = "vl"  # mim | mlm | vl | vqa | nlvr2 (see the module docstring)
    # An earlier stage's run directory (runs/<name>/<id>): this run starts from its weights
    # (and, through its own init_from, from the stages before it). "": from model.init_seed.
    init_from: str = field(default="", metadata=MUST_EXIST)
    multiway: bool = True  # false: the `standard` transformer, one shared FFN for every modality
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    # Blocks vlffn_start.. (0-based) have a vision-language FFN expert that takes every token of
    # an image-text input (base: 10 of 12; large: 21 of 24); = layers: no VL expert (the
    # fusion encoder keeps routing by modality throughout).
    vlffn_start: int = 3
    mlp_ratio: int = 4
    max_text_len: int = 32  # caption tokens, without the text [CLS] the model prepends
    layer_scale_init: float = 0.1  # LayerScale gamma of both residual branches
    dropout: float = 0.0
    init_temperature: float = 0.07  # ITC: learnable, logit scale = log(1 / T)
    contrastive_weight: float = 1.0  # ITC (dual encoder)
    itm_weight: float = 1.0  # ITM with hard negatives from the ITC similarities (fusion encoder)
    mlm_weight: float = 0.0  # MLM on the fused image-text input (0: off)
    mlm_prob: float = 0.15
    rerank_k: int = 8  # evaluation: re-rank each query's ITC top-k by the ITM score (0: off)
    frozen: bool = False  # freeze the multiway transformer and train adapters (+ heads) only
    # The VL contrastive head: image-only and text-only inputs also run the top blocks
    # (vlffn_start..) through the VL expert; a second ITC on those [CLS] tokens (VLMo's code).
    vl_itc_weight: float = 0.0
    itc_gather: bool = True  # ITC / hard negatives over the features of every rank (all-gather)
    # Stage mim (BEiT): block-wise masking of mim_mask_ratio of the patches in blocks of at
    # least mim_min_block patches; targets: ids in a fixed random codebook of mim_vocab codes.
    mim_mask_ratio: float = 0.4
    mim_min_block: int = 16
    mim_vocab: int = 8192
    mim_code_dim: int = 32
    mim_codebook_seed: int = 0
    # Fine-tuning heads on the fused [T_CLS] (built when set): VQA answer classifier over
    # vqa_answers answers (BCE on soft scores); NLVR2 (two images, one text, binary).
    # Stage vqa: must equal the training cache's vocabulary size (3129 for the standard list);
    # 0 takes it from data.train_cache's manifest at submit (the resolved config.yaml records it).
    vqa_answers: int = 0
    nlvr2: bool = False
    # Stages vqa / nlvr2: a cache of the same kind, e.g. VQA test-dev (no answers), whose answers
    # `dodo eval RUN --task predict` writes in the evaluation server's format ("": data.eval_cache).
    predict_cache: str = field(default="", metadata=MUST_EXIST)
    # Stage vqa: the BCE targets per answer: "soft" min(1, annotators / 3), or "official" the
    # official leave-one-annotator-out accuracy (0.3 / 0.6 / 0.9 / 1; ViLT's and VLMo's code).
    vqa_targets: str = "soft"
    # Stages vqa / nlvr2: the new head's learning rate is train.lr x this (VLMo's lr_mult: 20 for
    # VQA; its NLVR2 setting keeps 1).
    head_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "hidden", "layers", "heads", "mlp_ratio", "max_text_len"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.hidden % self.heads == 0, "hidden", f"must be divisible by heads={self.heads}")
        check(self.image_size % self.patch_size == 0, "patch_size",
              f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        check(0 <= self.vlffn_start <= self.layers, "vlffn_start",
              f"must be in [0, layers={self.layers}] (= layers: no VL expert), got {self.vlffn_start}")
        check(self.layer_scale_init > 0, "layer_scale_init", f"must be > 0, got {self.layer_scale_init}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.init_temperature > 0, "init_temperature", f"must be > 0, got {self.init_temperature}")
        for name in ("contrastive_weight", "itm_weight", "mlm_weight"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.stage in STAGES, "stage", f"must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.stage == "vl":
            check(self.contrastive_weight + self.itm_weight + self.mlm_weight > 0, "contrastive_weight",
                  "all loss weights are 0: set contrastive_weight, itm_weight or mlm_weight")
        check(self.vl_itc_weight >= 0, "vl_itc_weight", f"must be >= 0, got {self.vl_itc_weight}")
        if self.vl_itc_weight > 0:
            check(self.multiway and self.vlffn_start < self.layers, "vl_itc_weight",
                  "the VL contrastive head runs the top blocks through the VL expert, which this model "
                  f"lacks (multiway={self.multiway}, vlffn_start={self.vlffn_start}, layers={self.layers}); "
                  "set vl_itc_weight=0 or multiway=true with vlffn_start < layers")
        check(0 < self.mim_mask_ratio < 1, "mim_mask_ratio", f"must be in (0, 1), got {self.mim_mask_ratio}")
        grid = (self.image_size // self.patch_size) ** 2
        check(self.stage != "mim" or 1 <= self.mim_min_block <= max(1, int(self.mim_mask_ratio * grid)), "mim_min_block",
              f"must be in [1, mim_mask_ratio * patches = {int(self.mim_mask_ratio * grid)}] "
              f"({grid} patches of {self.patch_size} px), got {self.mim_min_block}")
        for name in ("mim_vocab", "mim_code_dim"):
            check(getattr(self, name) > 1, name, f"must be > 1, got {getattr(self, name)}")
        check(self.vqa_answers >= 0, "vqa_answers", f"must be >= 0, got {self.vqa_answers}")
        check(self.stage != "nlvr2" or self.nlvr2, "nlvr2",
              "is false, but model.vlmo.stage=nlvr2 trains the NLVR2 head: set model.vlmo.nlvr2=true")
        check(self.head_lr_mult > 0, "head_lr_mult", f"must be > 0, got {self.head_lr_mult}")
        check(self.vqa_targets in ("soft", "official"), "vqa_targets",
              f"must be soft (min(1, annotators / 3)) or official (0.3 / 0.6 / 0.9 / 1), got {self.vqa_targets!r}")
        check(not self.predict_cache or self.stage in FINETUNE, "predict_cache",
              f"is set, but model.vlmo.stage={self.stage} predicts nothing; it is for the stages vqa and nlvr2")
        check(0 < self.mlm_prob < 1, "mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        check(self.rerank_k >= 0, "rerank_k", f"must be >= 0, got {self.rerank_k}")


# Adapter kinds the multiway transformer cannot take, and why (refused at submit).
REFUSED_ADAPTERS = {
    "prefix": "prefix tuning needs transformers' attention interface, which VLMo's own attention lacks",
    "mam": "MAM includes prefix tuning, which needs transformers' attention interface",
    "film": "FiLM needs a condition, which VLMo does not provide",
}


@dataclass
class VlmoModelConfig(ModelConfig):
    """A VLMo multiway transformer: dual encoder (ITC) and fusion encoder (ITM, MLM)."""

    family: str = "vlmo"
    vlmo: VlmoConfig = field(default_factory=VlmoConfig)

    def init_weights_run(self) -> str:
        return self.vlmo.init_from


def validate_job(job) -> None:  # JobConfig -> None (ConfigValueError with the full key path)
    """The images and captions the data gives must fit the model's positions."""
    v, d = job.model.vlmo, job.data
    check(d.image_size == v.image_size, "data.image_size",
          f"is {d.image_size}, but model.vlmo.image_size={v.image_size}: the model has positions for "
          f"{v.image_size} px images; set both to the same value")
    check(d.max_caption_tokens <= v.max_text_len, "data.max_caption_tokens",
          f"is {d.max_caption_tokens}, more than model.vlmo.max_text_len={v.max_text_len} text positions; "
          "raise model.vlmo.max_text_len or lower data.max_caption_tokens")
    _check_stage_data(job)


# What each stage reads, and the cache modality that lacks it (the stage, the fix).
_STAGE_LACKS = {"mim": ("text", "images", "an image-only cache (`dodo data cache TREE --from folder`) or an "
                        "image-text one"),
                "mlm": ("image", "captions", "a text-only cache (`dodo data cache FILE --from text`) or an "
                        "image-text one"),
                "vl": ("", "image-text pairs", "an image-text cache (e.g. `dodo data cache --from karpathy`)")}


def _check_stage_data(job) -> None:
    """A stage refuses a cache without its modality (mim: images, mlm: texts, vl: both); reads
    manifest.json only (torch-free); a cache not built yet is left to `dodo submit`'s checks."""
    from pathlib import Path

    from dodo.data.manifest import CacheError, describe

    d, stage = job.data, job.model.vlmo.stage
    if stage in FINETUNE:
        return _check_finetune_data(job)
    if d.kind == "synthetic":
        return
    lacking, needs, fix = _STAGE_LACKS[stage]
    for key in ("train_cache", "eval_cache"):
        path = getattr(d, key)
        if not path or not (Path(path).expanduser() / "manifest.json").exists():
            continue
        try:
            modality = describe(path).modality
        except CacheError:
            continue
        bad = modality != "image_text" if stage == "vl" else modality == lacking
        check(not bad, f"data.{key}",
              f"{path} is a {modality}-only cache, but model.vlmo.stage={stage} "
              f"reads {needs}; point data.{key} at {fix}")


# ---------------------------------------------------------------- fine-tuning stages (vqa, nlvr2)

_BUILD = {"vqa": "`dodo data cache v2_OpenEnded_mscoco_<split>2014_questions.json --from vqa --out DIR` "
                 "(docs/data.md)",
          "nlvr2": "`dodo data cache <split>.json --from nlvr2 --images IMAGES --out DIR` (docs/data.md)"}
_HELD_OUT = {"vqa": "the val2014 questions", "nlvr2": "dev.json"}


def _finetune_manifest(path: str):
    """The manifest of a built cache (torch-free), or None: one not built yet is left to
    `dodo submit`'s cache checks."""
    from pathlib import Path

    from dodo.data.manifest import CacheError, describe

    if not path or not (Path(path).expanduser() / "manifest.json").exists():
        return None
    try:
        return describe(path)
    except CacheError:
        return None


def _check_finetune_data(job) -> None:
    """data.kind, the caches' source kind and targets, and model.vlmo.vqa_answers against the
    training cache's answer vocabulary (0: set from it; left 0 while the cache is not built, which
    `dodo submit` then refuses, and the task refuses at run time)."""
    d, v = job.data, job.model.vlmo
    stage = v.stage
    check(d.kind != "synthetic", "data.kind",
          f"is synthetic, but model.vlmo.stage={stage} reads a cache built --from {stage}; set data.kind=hdf5 "
          f"and data.train_cache to one built with {_BUILD[stage]}")
    check(bool(d.eval_cache), "data.eval_cache",
          f"is empty, but model.vlmo.stage={stage} is scored on a held-out cache; build one from "
          f"{_HELD_OUT[stage]} with {_BUILD[stage]} and set data.eval_cache")
    target = "answers" if stage == "vqa" else "labels"
    for key in ("data.train_cache", "data.eval_cache", "model.vlmo.predict_cache"):
        path = v.predict_cache if key.startswith("model") else getattr(d, key[5:])
        m = _finetune_manifest(path)
        if m is None:
            continue
        kind = m.source.get("kind")
        check(kind == stage, key,
              f"{path} is a {kind} cache, but model.vlmo.stage={stage} reads one built --from {stage}; "
              f"build it with {_BUILD[stage]}")
        check(m.image_size == d.image_size, key,
              f"{path} holds {m.image_size} px images, but data.image_size={d.image_size}; set data.image_size and "
              f"model.vlmo.image_size to {m.image_size}, or rebuild the cache with --image-size {d.image_size}")
        if key.startswith("model"):  # predictions need no answers (test-dev)
            continue
        key = key[5:]
        has = m.source.get("annotated" if stage == "vqa" else "labelled", False)
        check(bool(has), f"data.{key}",
              f"{path} has no {target} (a test split), so model.vlmo.stage={stage} can neither train nor "
              f"score on it; point data.{key} at an annotated split ({_HELD_OUT[stage]} for eval)")
        if stage == "vqa" and key == "train_cache":
            n = int(m.source.get("answers", 0))
            if v.vqa_answers == 0:  # "from the cache": resolved here, so config.yaml records the number
                v.vqa_answers = n
            check(v.vqa_answers == n, "model.vlmo.vqa_answers",
                  f"is {v.vqa_answers}, but data.train_cache {path} has {n} answers in its vocabulary "
                  f"(--min-count {m.source.get('min_count')}); set model.vlmo.vqa_answers={n}")


def default_suites(job) -> tuple[str, ...]:
    """Suites measured by default on real data: retrieval for the vl stage; none for the mim /
    mlm stages (held-out eval.mim_accuracy / eval.mlm_accuracy; they may read a unimodal cache)
    nor for vqa / nlvr2 (held-out eval.vqa_score / eval.nlvr2_accuracy on data.eval_cache)."""
    return ("retrieval",) if job.model.vlmo.stage == "vl" else ()


def backbone_parameters(v: VlmoConfig, vocab_size: int) -> int:
    """Parameters of the transformer and its embeddings, without the task heads (torch-free,
    for planning and the paper's counts: VLMo-Base 175M, -Large 562M with BERT's 30,522 words).
    ``multiway: false`` holds one FFN per block instead of two (three in the fusion blocks)."""
    d, f = v.hidden, v.mlp_ratio * v.hidden
    patches = (v.image_size // v.patch_size) ** 2
    embed = (3 * v.patch_size ** 2 * d + d) + d + (1 + patches) * d + vocab_size * d + d + (1 + v.max_text_len) * d + 2 * d
    expert = 2 * d + (d * f + f) + (f * d + d)  # LayerNorm + fc1 + fc2
    block = 2 * d + 4 * (d * d + d) + 2 * d  # norm1, attention, LayerScale gammas
    experts = sum((3 if i >= v.vlffn_start else 2) if v.multiway else 1 for i in range(v.layers))
    return embed + v.layers * block + experts * expert + 2 * d  # + the final LayerNorm
