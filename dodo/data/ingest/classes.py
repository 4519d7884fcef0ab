"""Class names for labelled sources: read a class-names file, map source class ids to names.

A label is an index into the sorted class ids (ImageNet wnids ``n01440764`` ..., folder names,
CIFAR indices). The names file may be

- one name per line, in sorted-class-id order (``tench`` on line 1 for ``n01440764``);
- ``LOC_synset_mapping.txt`` style: ``n01440764 tench, Tinca tinca`` (id, space, names; the
  first comma-separated synonym is the class name, as CLIP's prompts use);
- JSON: a list of names in label order, a dict ``{"n01440764": "tench", ...}``, or
  torchvision's / Keras' ``imagenet_class_index.json`` (``{"0": ["n01440764", "tench"], ...}``).

Files keyed by id may hold more ids than the source has folders: ImageNet-R and ImageNet-A have
200 of the 1000 wnids, so the full ImageNet mapping serves them too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from dodo.data.ingest import SourceError, require_path

WNID = re.compile(r"^n\d{8}$")


def sort_class_ids(ids: Sequence[str]) -> list[str]:
    """Folder names in label order: numerically when all are integers (ImageNetV2's ``0``..``999``
    folders are label indices), else as strings (wnids sort into ImageNet's label order)."""
    if ids and all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def _first_synonym(names: str) -> str:
    return names.split(",")[0].strip()


def read_names_file(path: Path) -> list[str] | dict[str, str]:
    """The file as a list (names in label order) or a dict (class id -> name)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SourceError(f"class-names file {path} is not valid JSON ({err})") from None
        if isinstance(data, list):
            return [str(n) for n in data]
        if isinstance(data, dict):
            values = list(data.values())
            if values and all(isinstance(v, list) and len(v) == 2 for v in values):
                # imagenet_class_index.json: {"0": [wnid, name]}
                return {str(v[0]): str(v[1]).replace("_", " ") for v in values}
            return {str(k): str(v) for k, v in data.items()}
        raise SourceError(f"class-names file {path} must hold a JSON list or object")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all(WNID.match(line.split(maxsplit=1)[0]) and " " in line for line in lines):
        return {line.split(maxsplit=1)[0]: _first_synonym(line.split(maxsplit=1)[1]) for line in lines}
    return lines


def resolve_classnames(file: str, class_ids: Sequence[str]) -> list[str]:
    """Names for ``class_ids`` (in label order): from ``file`` when given, else the ids
    themselves (folder names such as ``golden_retriever`` become ``golden retriever``)."""
    if not file:
        return [i.replace("_", " ") for i in class_ids]
    path = require_path(file, "--classnames file")
    names = read_names_file(path)
    if isinstance(names, dict):
        missing = [i for i in class_ids if i not in names]
        if missing:
            raise SourceError(f"--classnames {file} names no class for {len(missing)} of the "
                              f"{len(class_ids)} classes (first: {missing[0]!r}); give a file that "
                              "covers every class folder")
        return [names[i] for i in class_ids]
    if len(names) != len(class_ids):
        raise SourceError(f"--classnames {file} lists {len(names)} names for {len(class_ids)} classes; "
                          "a plain list needs one name per class, in sorted class order (or use a "
                          "'wnid name' / JSON mapping file)")
    if sorted(names) == sorted(class_ids) and list(names) != list(class_ids):
        # The folder names themselves, listed in another order: read by position, every class
        # would get another's name (zero-shot then scores at chance without any error).
        raise SourceError(f"--classnames {file} lists the class folder names in another order than the "
                          f"labels (sorted folder order: {', '.join(list(class_ids)[:4])}, ...); a plain list "
                          "is read by position: reorder it, or drop --classnames (the folder names are "
                          "then the class names)")
    return names
