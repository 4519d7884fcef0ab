"""Class names, prompt templates and class subsets for zero-shot classification (torch-free).

Named lists come from the ``clip_benchmark`` package's shipped JSON files (CLIP's own
ImageNet names and its 80 templates, the VTAB / CIFAR / EuroSAT ... lists), never copied by
hand here:
    "clip_benchmark:<dataset>"        English, e.g. clip_benchmark:imagenet1k, clip_benchmark:cifar10
    "clip_benchmark_<lang>:<dataset>" its other languages: cn (alias zh), jp, it, ar
A file: one name / template per line, or a JSON list.

clip_benchmark's Python modules import torchvision, so we never import them: the JSON lists
are read as package data, and the ImageNet wnid lists (the 1000-class order and the
ImageNet-R / -A / -O subsets, which it ships only inside ``datasets/builder.py``) are read
from that file's source with ``ast.literal_eval``.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from pathlib import Path

# Names by which the shift sets reuse ImageNet's class names and templates.
IMAGENET_ALIASES = {"imagenet", "imagenet-1k", "imagenet_1k", "imagenet1k", "imagenetv2", "imagenet-v2",
                    "imagenet_v2", "imagenet_sketch", "imagenet-sketch", "imagenet_r", "imagenet-r",
                    "imagenet_a", "imagenet-a", "imagenet_o", "imagenet-o"}
LANGS = {"en": "en", "cn": "cn", "zh": "cn", "jp": "jp", "it": "it", "ar": "ar"}
# class_subset name -> the variable of clip_benchmark/datasets/builder.py holding its wnids
SUBSETS = {"imagenet_r": "imagenet_r_wnids", "imagenet_a": "imagenet_a_wnids", "imagenet_o": "imagenet_o_wnids"}


class ClassListError(ValueError):
    """A class-name / template source that cannot be read; the message names the fix."""


def _package_dir() -> Path:
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ClassListError("the clip_benchmark package is not installed; `make install` installs it "
                             "(pip install --no-deps clip_benchmark), or give a file instead")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets"


def canonical(dataset: str) -> str:
    """clip_benchmark's key for a dataset name: the ImageNet shift sets use imagenet1k's lists."""
    d = dataset.lower()
    return "imagenet1k" if d in IMAGENET_ALIASES else d


@functools.lru_cache(maxsize=None)
def _json(lang: str, what: str) -> dict:
    path = _package_dir() / f"{lang}_{what}.json"
    if not path.exists():
        raise ClassListError(f"clip_benchmark ships no {path.name}")
    return json.loads(path.read_text(encoding="utf-8"))


def _named(spec: str, what: str) -> list[str]:
    prefix, _, dataset = spec.partition(":")
    lang = "en" if prefix == "clip_benchmark" else LANGS.get(prefix.removeprefix("clip_benchmark_"), "")
    if not lang or not dataset:
        raise ClassListError(f"{spec!r}: write clip_benchmark:<dataset> or clip_benchmark_<lang>:<dataset> "
                             f"with lang in {sorted(LANGS)}")
    table = _json(lang, what)
    key = canonical(dataset)
    if key not in table:
        raise ClassListError(f"{spec!r}: clip_benchmark ships {what.replace('_', ' ')} in {lang!r} for "
                             f"{sorted(table)}, not {dataset!r}; give a file instead")
    return list(table[key])


def _from_file(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ClassListError(f"{spec!r} is neither clip_benchmark:<dataset> nor a file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ClassListError(f"{path}: a JSON list of strings is expected")
        return items
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_list(spec: str, what: str) -> list[str]:
    """``what``: "classnames" or "zeroshot_classification_templates"."""
    return _named(spec, what) if spec.startswith("clip_benchmark") else _from_file(spec)


def classnames(spec: str, manifest_names: list[str] | None = None) -> list[str]:
    """"" = the cache manifest's class names."""
    if not spec:
        if not manifest_names:
            raise ClassListError("the cache has no class names; set classnames: clip_benchmark:<dataset> or a file")
        return list(manifest_names)
    return load_list(spec, "classnames")


def templates(spec: str, dataset: str = "") -> list[str]:
    """"" = clip_benchmark's templates for ``dataset`` when it ships them, else CLIP's plain one."""
    if not spec:
        try:
            out = _named(f"clip_benchmark:{dataset}", "zeroshot_classification_templates") if dataset else []
        except ClassListError:
            out = []
        out = out or ["a photo of a {c}."]
    else:
        out = load_list(spec, "zeroshot_classification_templates")
    # clip_benchmark writes "{c}"; our templates write "{}" (str.format with one positional).
    out = [t.replace("{c}", "{}") for t in out]
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise ClassListError(f"template {bad[0]!r} has no {{}} (or {{c}}) where the class name goes")
    return out


@functools.lru_cache(maxsize=None)
def _builder_lists() -> dict[str, list[str]]:
    """The wnid lists assigned in clip_benchmark/datasets/builder.py, read without running it."""
    tree = ast.parse((_package_dir() / "builder.py").read_text(encoding="utf-8"))
    wanted = {"all_imagenet_wordnet_ids", *SUBSETS.values()}
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in wanted:
            out[node.targets[0].id] = sorted(ast.literal_eval(node.value)) if node.targets[0].id != \
                "all_imagenet_wordnet_ids" else list(ast.literal_eval(node.value))
    missing = wanted - set(out)
    if missing:
        raise ClassListError(f"this clip_benchmark version does not define {sorted(missing)} in builder.py")
    return out


def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 wnids in class-index order (the sorted folder order)."""
    return _builder_lists()["all_imagenet_wordnet_ids"]


def subset_indices(subset: str, class_ids: list[str] | None = None) -> list[int]:
    """For each label of a subset dataset (label i = i-th class of its cache), its index among
    ImageNet's 1000 classes. With the cache's ``class_ids`` (wnids) these give the mapping
    directly; without them the labels are taken to follow the subset's sorted wnids, as the
    class folders of ImageNet-R / -A sort."""
    if subset not in SUBSETS:
        raise ClassListError(f"class_subset {subset!r} is not one of {sorted(SUBSETS)}")
    order = {w: i for i, w in enumerate(imagenet_wnids())}
    wnids = _builder_lists()[SUBSETS[subset]]
    if class_ids:
        unknown = [c for c in class_ids if c not in order]
        if unknown:
            raise ClassListError(f"class_subset {subset}: the cache's class ids {unknown[:3]} are not ImageNet wnids")
        outside = sorted(set(class_ids) - set(wnids))
        if outside:
            raise ClassListError(f"class_subset {subset}: wnids {outside[:3]} are not in the {subset} subset")
        wnids = list(class_ids)
    return [order[w] for w in wnids]
