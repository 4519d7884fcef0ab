"""Checks that need the file system, run once at submit (the schema checks need none).

A config field declares that it names something that must already exist with
``field(default=None, metadata=MUST_EXIST)``; `missing_paths` walks the tree for them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

MUST_EXIST = {"must_exist": True}
BUILTIN_PREFIX = "builtin:"  # e.g. model.tokenizer=builtin:synthetic ships with dodo


def missing_paths(cfg: Any, prefix: str = "") -> list[str]:
    """One message per declared path that does not exist, naming the key and the fix."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += missing_paths(value, key + ".")
        elif f.metadata.get("must_exist") and isinstance(value, str) and value \
                and not value.startswith(BUILTIN_PREFIX) and not os.path.exists(value):
            problems.append(f"{key}={value!r} does not exist; point it at a local copy (nothing is "
                            "downloaded at run time) or override it, e.g. "
                            f"`dodo submit JOB {key}=/path/to/it`")
        elif f.metadata.get("must_exist") and isinstance(value, list):  # a list of paths
            for i, item in enumerate(value):
                if isinstance(item, str) and not os.path.exists(item):
                    problems.append(f"{key}[{i}]={item!r} does not exist; point it at an existing "
                                    f"path, e.g. `dodo submit JOB '{key}=[/path/to/it]'`")
    return problems
