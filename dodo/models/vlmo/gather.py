"""ITC and ITM hard negatives over the whole global batch (features all-gathered across ranks).

VLMo (like CLIP and ALBEF at scale) contrasts each rank's images and texts with those of every
rank. ``torch.distributed.nn.functional.all_gather`` keeps the gradient: its backward sends each
rank's gradient w.r.t. every gathered slice back to the slice's owner and sums it there. Each
rank computes the loss of its own rows only (``local_itc``: rows = local queries, columns =
the gathered candidates); the mean of these over ranks is the one-process loss on the global
batch, and since DeepSpeed averages gradients over ranks, the update equals it too (tested:
tests/test_vlmo_gather.py, 2 gloo ranks against 1).

Hard negatives (``global_hard_negatives``): every rank builds the same global (B, B)
similarity from the gathered features and draws the negatives of all B rows with one generator
seeded by rank 0 (broadcast), then keeps its own rows; so the draw equals the one-process draw
on the same global batch, and a negative may come from any rank. The negatives' raw inputs
(pixels, token ids) are gathered without gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dodo import losses


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) per rank -> (world * b, ...), rank order, differentiable (identity on 1 rank)."""
    if world()[1] == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """(B, T) -> (B, length), right-padded with ``value`` (ranks' batches have other lengths)."""
    return F.pad(x, (0, length - x.shape[1]), value=value)


def local_itc(img: torch.Tensor, txt: torch.Tensor, img_all: torch.Tensor, txt_all: torch.Tensor,
              scale: torch.Tensor, rank: int, positives_all: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's b rows against the B gathered columns.

    img, txt: (b, D) local, unit norm; img_all, txt_all: (B, D) gathered (this rank's rows at
    rank * b); positives_all: (B, B) bool or None (pair i only). On one rank this is
    ``losses.info_nce`` exactly (same targets; tested)."""
    b = len(img)
    rows = torch.arange(rank * b, (rank + 1) * b, device=img.device)
    i2t, t2i = scale * img @ txt_all.T, scale * txt @ img_all.T  # (b, B) each
    if positives_all is None or not bool(positives_all.clone().fill_diagonal_(False).any()):
        return 0.5 * (F.cross_entropy(i2t, rows) + F.cross_entropy(t2i, rows))
    target = positives_all[rows].to(i2t.dtype)  # symmetric relation: a text's row is its column
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))


def shared_generator(device: torch.device, world_size: int) -> torch.Generator:
    """A generator seeded alike on every rank: rank 0 draws the seed from the global RNG
    (so a run stays reproducible from train.seed) and broadcasts it (world_size > 1)."""
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.long)
    if world_size > 1:
        seed = seed.to(device) if dist.get_backend() == "nccl" else seed
        dist.broadcast(seed, 0)
    return torch.Generator().manual_seed(int(seed.cpu()))


def global_hard_negatives(sim_all: torch.Tensor, positives_all: torch.Tensor, rank: int, b: int,
                          world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the global (B, B) similarity (detached) -> (global text index per local image,
    global image index per local text), each (b,), drawn as ``losses.hard_negatives`` does."""
    g = shared_generator(sim_all.device, world_size)
    neg_txt, neg_img = losses.hard_negatives(sim_all.float().cpu(), positives_all.cpu(), generator=g)
    lo = rank * b
    return neg_txt[lo: lo + b].to(sim_all.device), neg_img[lo: lo + b].to(sim_all.device)
