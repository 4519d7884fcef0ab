"""Import open_clip and timm on machines without torchvision.

Why this exists: both packages import torchvision at package import time, but neither needs it
to BUILD a model. timm and open_clip.utils import only ``torchvision.ops.misc.FrozenBatchNorm2d``
(used by their "freeze batch norm" helpers, never while constructing a ViT or a ResNet), and
open_clip.transform imports torchvision's image transforms for its preprocessing pipelines,
which dodo does not use (dodo's data code makes its own (B, 3, H, W) tensors). There is no CPU
build of torchvision for the pinned torch here, so they are installed ``--no-deps``
(Makefile) and imported through ``import_open_clip()`` / ``import_timm()``.

Alternatives judged and rejected:
  * importing the submodules without the package ``__init__``: open_clip's modules use relative
    imports of each other and of ``open_clip.utils``, which still imports torchvision; it would
    mean re-creating the package by hand and breaks with every release.
  * dodo's own copy of the OpenAI CLIP architecture: duplicates a library made for the field and
    loses open_clip's parity with the published checkpoints.

What the stand-in is, exactly: while (and only while) the library is imported, ``sys.modules``
holds a ``torchvision`` package whose ``ops.misc.FrozenBatchNorm2d`` is a faithful
re-implementation (same buffers, same arithmetic as torchvision's), and whose ``transforms``
names are classes that raise a clear error when instantiated. Afterwards the stand-in is removed
from ``sys.modules`` again, so no other library (transformers' availability checks, dynamo) ever
sees a "torchvision". Where the real torchvision is installed it is used and nothing is faked.
"""

from __future__ import annotations

import enum
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any



class MissingTorchvision(RuntimeError):
    pass


def _frozen_batch_norm() -> type:
    import torch
    from torch import nn

    class FrozenBatchNorm2d(nn.Module):
        """BatchNorm2d with fixed statistics and affine parameters (torchvision.ops.misc's)."""

        def __init__(self, num_features: int, eps: float = 1e-5):
            super().__init__()
            self.eps = eps
            self.register_buffer("weight", torch.ones(num_features))
            self.register_buffer("bias", torch.zeros(num_features))
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))

        def _load_from_state_dict(self, state_dict, prefix, *args):  # type: ignore[no-untyped-def]
            state_dict.pop(prefix + "num_batches_tracked", None)
            super()._load_from_state_dict(state_dict, prefix, *args)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
            w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
            rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
            scale = w * (rv + self.eps).rsqrt()
            return x * scale + (b - rm * scale)

    return FrozenBatchNorm2d


def _unavailable(name: str) -> type:
    if name.startswith("__"):  # dunder probes (__file__, __all__...) are plain misses
        raise AttributeError(name)

    class Unavailable:
        def __init__(self, *args: Any, **kwargs: Any):
            raise MissingTorchvision(f"torchvision's {name} is not installed here; dodo "
                                     "preprocesses images itself (dodo.data), not with open_clip's "
                                     "transforms")
    Unavailable.__name__ = name
    return Unavailable


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves every ``torchvision.*`` import to a stand-in module while installed."""

    def __init__(self) -> None:
        self.frozen_bn = _frozen_batch_norm()
        self.made: list[str] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # every stand-in is a package, so any submodule import resolves here
        mod.FrozenBatchNorm2d = self.frozen_bn  # type: ignore[attr-defined]  # ops.misc's
        mod.InterpolationMode = enum.Enum("InterpolationMode", {  # type: ignore[attr-defined]
            "NEAREST": "nearest", "BILINEAR": "bilinear", "BICUBIC": "bicubic", "BOX": "box",
            "HAMMING": "hamming", "LANCZOS": "lanczos", "NEAREST_EXACT": "nearest-exact"})
        mod.__getattr__ = _unavailable  # type: ignore[attr-defined]  # any other name: a class that raises
        self.made.append(spec.name)
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _import_without_torchvision(name: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"the {name!r} package is not installed; run `make install` "
                                  "(it installs open_clip_torch and timm with --no-deps)")
    if importlib.util.find_spec("torchvision") is not None:  # the real one: nothing to fake
        return importlib.import_module(name)
    # transformers probes "is torchvision installed?" once and caches the answer (lru_cache);
    # ask it now, before the stand-in exists, so it keeps the true answer (False).
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()
    import_utils.is_torchvision_v2_available()
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(name)
    finally:
        sys.meta_path.remove(finder)
        for n in finder.made:
            sys.modules.pop(n, None)


def import_timm() -> types.ModuleType:
    return _import_without_torchvision("timm")


def import_open_clip() -> types.ModuleType:
    import_timm()  # open_clip's timm tower support imports timm lazily; import it the same way
    return _import_without_torchvision("open_clip")
