"""VLMo's stagewise pretraining parts: BEiT block-wise masking, the visual-token targets of
masked image modelling, and which parameters each stage trains.

Visual tokens. BEiT (and VLMo's image-only stage) predicts, for each masked patch, the id a
trained dVAE tokenizer (DALL-E's) gives that patch. No such tokenizer can be had offline, so the
targets come from a fixed random-projection quantizer (BEST-RQ, Chiu et al. 2022): each patch's
pixels (as the model sees them, normalised by the data's mean / std; not per patch, so a flat
patch's colour still picks its code) are projected by a fixed Gaussian matrix and the id of the
nearest (cosine) of ``mim_vocab`` fixed random unit codes is the target. This keeps BEiT's loss
(softmax cross-entropy over a discrete visual vocabulary, on masked patches only) and its
masking, needs no tokenizer training pass (a k-means codebook would be a stage of its own
over the data), and is the same on every rank and in every stage (both tensors come from
``mim_codebook_seed``; non-persistent buffers, never in a checkpoint). Pixel regression
(MAE / SimMIM) would change the loss the paper trains with, so it is not the default here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def block_mask(batch: int, grid: int, ratio: float, min_block: int, generator: torch.Generator | None = None,
               min_aspect: float = 0.3) -> torch.Tensor:
    """BEiT's block-wise masking (``MaskingGenerator`` of the BEiT code): per image, rectangles of
    at least ``min_block`` patches with aspect ratio in [min_aspect, 1 / min_aspect] at random
    places until ``round(ratio * grid**2)`` patches are masked (or 10 tries add nothing).
    Returns (batch, grid * grid) bool, True = masked. A loop in Python, as BEiT's (on a grid of
    at most 14 x 14 it costs far less than the forward pass)."""
    target = int(round(ratio * grid * grid))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    out = torch.zeros(batch, grid, grid, dtype=torch.bool)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def randint(lo: int, hi: int) -> int:  # inclusive, as random.randint
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    for b in range(batch):
        mask, count = out[b], 0
        while count < target:
            budget, delta = target - count, 0
            for _ in range(10):
                area = uniform(min(min_block, budget), budget)
                aspect = math.exp(uniform(*log_aspect))
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if 0 < h <= grid and 0 < w <= grid:
                    top, left = randint(0, grid - h), randint(0, grid - w)
                    region = mask[top: top + h, left: left + w]
                    new = h * w - int(region.sum())
                    if 0 < new <= budget:
                        region.fill_(True)
                        delta = new
                if delta > 0:
                    break
            if delta == 0:
                break
            count += delta
    return out.flatten(1)


def patch_pixels(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3 * patch * patch), patches in row-major order (as the patch embedding)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class RandomCodebook(nn.Module):
    """Fixed random-projection quantizer: patch pixels -> visual-token ids (see the module docstring)."""

    def __init__(self, patch_dim: int, code_dim: int, vocab: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(patch_dim, code_dim, generator=g) / math.sqrt(patch_dim),
                             persistent=False)
        self.register_buffer("codes", F.normalize(torch.randn(vocab, code_dim, generator=g), dim=-1),
                             persistent=False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, patch_dim) -> (B, N) long ids."""
        z = F.normalize(pixels.float() @ self.proj, dim=-1)  # (B, N, code_dim)
        return (z @ self.codes.T).argmax(-1)


# ---------------------------------------------------------------- what each stage trains

# Parameter-name prefixes (after ``blocks.<i>.``: the block-relative name) that train per stage.
# mim: the image path and the shared attention (BEiT's whole ViT); mlm: the text embeddings and
# the text expert only (attention, LayerScale, image expert, final norm stay as mim left them);
# vl: everything. In the `standard` transformer the one shared FFN is the expert of every stage.
_IMAGE_EMBED = ("patch_embed.", "image_cls", "image_pos", "type_embed.", "mim_token", "mim_head.", "norm.")
_TEXT_EMBED = ("word_embed.", "text_cls", "text_pos", "mlm_head.")
_BLOCK = {"mim": ("norm1.", "attn.", "gamma_1", "gamma_2", "experts.image.", "experts.shared."),
          "mlm": ("experts.text.", "experts.shared.")}


def trains_in_stage(name: str, stage: str) -> bool:
    """Whether parameter ``name`` of a VlmoModel trains in ``stage`` (mim | mlm | vl)."""
    if stage == "vl":
        return True
    if name.startswith("blocks."):
        rel = name.split(".", 2)[2]
        return rel.startswith(_BLOCK[stage])
    return name.startswith(_IMAGE_EMBED if stage == "mim" else _TEXT_EMBED)


def freeze_for_stage(model: nn.Module, stage: str) -> list[str]:
    """requires_grad per ``trains_in_stage``; returns the names left trainable."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains_in_stage(name, stage))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def resize_positions(pos: torch.Tensor, patches: int) -> torch.Tensor:
    """Image position embeddings (1, 1 + N, d) of a sqrt(N) x sqrt(N) patch grid -> (1, 1 +
    patches, d): the [CLS] position kept, the grid resized bicubically (BEiT / ViLT / VLMo's
    ``interpolate_pos_embed``, how VLMo fine-tunes VQA at 480 px and NLVR2 at 384 px from 224 px
    pretraining)."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(patches)
    if old * old != pos.shape[1] - 1 or new * new != patches:
        raise ValueError(f"position embeddings of {pos.shape[1] - 1} / {patches} patches are not square grids")
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, d, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, patches, -1).to(pos.dtype)], dim=1)


def load_stage_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Copy an earlier stage's tensors into ``model`` by name; names only one side has are
    skipped (the previous stage's MIM head, this stage's new heads); a shape mismatch is an
    error (another model size), except the image positions of another image size (same patch
    size), which are resized (``resize_positions``). Returns the names loaded."""
    own = model.state_dict()
    pos = weights.get("image_pos")
    if pos is not None and "image_pos" in own and pos.shape[1] != own["image_pos"].shape[1] \
            and pos.shape[2] == own["image_pos"].shape[2]:
        weights = {**weights, "image_pos": resize_positions(pos, own["image_pos"].shape[1] - 1)}
    shared = [any(".experts.shared." in k for k in d) for d in (weights, own)]
    if any(".experts." in k for k in weights) and shared[0] != shared[1]:
        raise ValueError(f"model.vlmo.init_from: the earlier stage is a {'standard' if shared[0] else 'multiway'} "
                         f"transformer, this run a {'standard' if shared[1] else 'multiway'} one; set "
                         f"model.vlmo.multiway={str(not shared[0]).lower()} as that stage")
    bad = [f"{k}: {tuple(v.shape)} there, {tuple(own[k].shape)} here" for k, v in weights.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError("model.vlmo.init_from: the earlier stage's model has other sizes (" + "; ".join(bad[:3])
                         + "); use the same model.vlmo sizes as that stage")
    loaded = [k for k in weights if k in own]
    if not loaded:
        raise ValueError("model.vlmo.init_from: the earlier stage's checkpoint shares no tensor name with this "
                         "model; is it a VLMo run?")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(weights[k].to(own[k].dtype))
    return loaded
