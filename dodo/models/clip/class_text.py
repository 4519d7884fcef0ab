"""Classification fine-tuning of a dual encoder (R-Adapter's recipe): on a labelled cache the
text of each image is its class name in a prompt template, and every pair of the same class is
a positive of MPM-NCE / InfoNCE (``model.clip.text_source: class_templates``).

    caption(i) = templates[t(i)].format(classnames[label(i)])    t(i) = (i * 40503 + seed) mod T
    image_id(i) = label(i)             -> the collator's image_ids -> positives_from_ids: same class

Class names: ``model.clip.class_names`` ("" = the cache manifest's, else clip_benchmark:<dataset>
or a file); templates: ``model.clip.class_templates`` ("" = clip_benchmark's templates of the
manifest's dataset when it ships them, else "a photo of a {}."), both read by
dodo/eval/classnames.py, as the zero-shot suite reads them. The template of a sample is a fixed
function of its index (a multiplicative hash), so a run stays deterministic and resumable; the
dataset's images spread over all templates. The held-out split gets the same texts but keeps
its image ids (its retrieval metrics stay per image).

Torch-free: ``check_text_source`` runs at submit (the family's validate), the wrapper only
rewrites Sample fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dodo.config.errors import check

_HASH = 40503  # odd multiplier (Knuth's 16-bit golden-ratio constant): neighbours get different templates


def class_lists(job: Any) -> tuple[list[str], list[str]]:
    """(class names, templates) of the run's training cache (raises ClassListError / CacheError)."""
    from dodo.data.manifest import describe
    from dodo.eval import classnames as cn

    m = describe(job.data.train_cache)
    c = job.model.clip
    return cn.classnames(c.class_names, list(m.classnames or [])), cn.templates(c.class_templates, m.dataset or "")


def check_text_source(job: Any) -> None:
    """Refuse class_templates on data without labels or class names (one line, at submit)."""
    if getattr(job.model.clip, "text_source", "captions") != "class_templates":
        return
    d = job.data
    key = "model.clip.text_source"
    check(d.kind != "synthetic", key, "is class_templates, but data.kind=synthetic has no class labels; "
          "point data.train_cache at a labelled cache (dodo data cache ROOT --from folder|cifar) or set "
          "model.clip.text_source=captions")
    if not (Path(d.train_cache).expanduser() / "manifest.json").exists():
        check(not d.synthetic_on_first_use, key, f"is class_templates, but data.train_cache={d.train_cache} "
              "is built from the synthetic shapes (no class labels); point it at a labelled cache")
        return  # a cache not built yet: the cache checks of `dodo submit` name it
    from dodo.data.manifest import CacheError, describe
    from dodo.eval.classnames import ClassListError

    try:
        m = describe(d.train_cache)
    except CacheError:
        return  # a damaged manifest: named by the cache checks
    check(bool(m.has_labels), key, f"is class_templates, but data.train_cache={d.train_cache} has no labels "
          "(manifest has_labels false); build a labelled cache (dodo data cache ROOT --from folder|cifar) "
          "or set model.clip.text_source=captions")
    try:
        names, _ = class_lists(job)
    except ClassListError as err:
        check(False, key, f"is class_templates, but {err} (data.train_cache={d.train_cache}); "
              "set model.clip.class_names / class_templates")
        return
    n = len(m.classnames or m.class_ids)
    check(not n or len(names) == n, "model.clip.class_names",
          f"gives {len(names)} names but data.train_cache={d.train_cache} has {n} classes; name the list of its classes")


class ClassTemplateTexts:
    """A dataset view whose samples carry class prompts as captions (see the module doc)."""

    def __init__(self, base: Any, classnames: list[str], templates: list[str], seed: int = 0,
                 ids_from_labels: bool = True):
        self.base, self.classnames, self.templates = base, classnames, templates
        self.seed, self.ids_from_labels = seed, ids_from_labels

    def __len__(self) -> int:
        return len(self.base)

    def caption(self, index: int, label: int) -> str:
        return self.templates[(index * _HASH + self.seed) % len(self.templates)].format(self.classnames[label])

    def __getitem__(self, index: int) -> Any:
        s = self.base[index]
        if not 0 <= s.label < len(self.classnames):
            raise ValueError(f"sample {s.key} has label {s.label}, outside the {len(self.classnames)} class names "
                             "(model.clip.text_source=class_templates needs a labelled cache)")
        return dataclasses.replace(s, caption=self.caption(int(index), s.label), tokens=None,
                                   image_id=s.label if self.ids_from_labels else s.image_id)


def wrap_datasets(cfg: Any, train: Any, evals: Any) -> tuple[Any, Any]:
    """(train, held-out) with class-prompt texts; training pairs of one class are positives."""
    names, temps = class_lists(cfg)
    return (ClassTemplateTexts(train, names, temps, cfg.data.seed),
            ClassTemplateTexts(evals, names, temps, cfg.data.seed, ids_from_labels=False))
