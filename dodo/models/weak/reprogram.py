"""Reprogramming a frozen model: adversarial (input-space perturbation + label mapping) and
cross-modal (another modality's tokens mapped into the patch-embedding space).

Adversarial reprogramming (Elsayed et al., ICLR 2019): the target image x (B, 3, h, w) is
resized to ``inner`` x ``inner`` and placed in the centre of the model's S x S canvas (zeros,
i.e. the normalisation mean, elsewhere); a learned program W (3, S, S) is added through the
frame mask M (1 outside the centre, 0 inside), bounded by tanh:

    X_adv = pad(resize(x)) + tanh(W * M)        (the paper: P = tanh(W * M), X_adv = X~ + P)

so the centre holds the resized input exactly. The frozen model's source-label logits are mapped
to the target labels by ``LabelMap``. Only W (and a learned label map) train.

Cross-modal reprogramming (Neekhara et al., 2022): tokens of another modality (B, T, e), here
the frozen text encoder's input token embeddings, are mapped by a learned linear / MLP to the
ViT's patch-embedding width d and enter the frozen ViT in place of the patch embeddings (with
the ViT's own [CLS] and position embeddings). Only the map (and a learned label map) train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdversarialProgram(nn.Module):
    """The learned perturbation W (3, S, S) and the frame mask M (1, S, S) (a buffer)."""

    is_dodo_adapter = True
    output_params = ()

    def __init__(self, canvas: int, inner: int):
        super().__init__()
        if inner > canvas:
            raise ValueError(f"model.weak.reprogram.inner_size={inner} exceeds the model's {canvas} px input")
        self.canvas, self.inner = canvas, inner
        self.lo = (canvas - inner) // 2  # top-left corner of the embedded image
        self.program = nn.Parameter(torch.zeros(3, canvas, canvas))  # W; tanh(0) = 0: identity frame at init
        mask = torch.ones(1, canvas, canvas)
        mask[:, self.lo: self.lo + inner, self.lo: self.lo + inner] = 0.0
        self.register_buffer("mask", mask, persistent=False)  # derived from the sizes

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 3, S, S): resized to inner x inner (bilinear, antialiased), centred."""
        small = images if images.shape[-1] == self.inner and images.shape[-2] == self.inner else \
            F.interpolate(images, size=(self.inner, self.inner), mode="bilinear", antialias=True, align_corners=False)
        hi = self.canvas - self.inner - self.lo
        return F.pad(small, (self.lo, hi, self.lo, hi))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images) + torch.tanh(self.program * self.mask)


def fixed_label_map(n_source: int, n_target: int) -> torch.Tensor:
    """(n_source, n_target) 0/1 many-to-one assignment: source k -> target k mod n_target
    (Elsayed's arbitrary assignment, extended to several sources per target)."""
    if n_source < n_target:
        raise ValueError(f"label mapping: {n_source} source classes cannot cover {n_target} target classes; "
                         "give more model.weak.reprogram.source_classes")
    m = torch.zeros(n_source, n_target)
    m[torch.arange(n_source), torch.arange(n_source) % n_target] = 1.0
    return m


class LabelMap(nn.Module):
    """Source logits (B, K_s) -> target logits (B, K_t).

    fixed: a target's probability is the summed probability of its sources (the many-to-one
      mapping of reprogramming work after Elsayed): log(softmax(logits) @ M), M 0/1 (a buffer).
      Averaging the logits instead cancels out over hundreds of sources per target.
    learned: a linear map of the logits, logits @ W, W initialised at M / |sources of the target|.
    """

    is_dodo_adapter = True
    output_params = ()

    def __init__(self, n_source: int, n_target: int, learned: bool = False):
        super().__init__()
        m = fixed_label_map(n_source, n_target)
        self.learned = learned
        if learned:
            self.weight = nn.Parameter(m / m.sum(0, keepdim=True))
        else:
            self.register_buffer("weight", m, persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.learned:
            return logits @ self.weight.to(logits.dtype)
        probs = logits.float().softmax(-1) @ self.weight  # (B, K_t), rows sum to 1
        return probs.clamp_min(1e-12).log()


class TokenMap(nn.Module):
    """Cross-modal: (B, T, e) token embeddings -> (B, T, d) patch-space tokens."""

    is_dodo_adapter = True
    output_params = ()

    def __init__(self, e: int, d: int, kind: str = "linear", hidden: int = 128):
        super().__init__()
        self.net = nn.Linear(e, d) if kind == "linear" else nn.Sequential(
            nn.Linear(e, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)
