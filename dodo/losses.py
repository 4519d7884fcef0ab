"""Training objectives. Embeddings are L2-normalised by the caller; shapes in comments.

Contrastive losses average the image->text and text->image directions, each a mean over the
batch, so InfoNCE and MPM-NCE are on the same scale (MPM-NCE with eps = 0, delta = 0, one
positive per sample and tau = 1 / logit_scale *is* InfoNCE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def positives_from_ids(positive_ids: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: samples i and j are positives of each other when they share an id (B,):
    the image id (several captions of one image in a batch), or the class id when fine-tuning
    on a classification dataset with class templates as texts. All-distinct ids: the identity."""
    return positive_ids[:, None] == positive_ids[None, :]


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
             positive_ids: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE; pair i is the positive of row i. image, text: (B, D).

    With ``positive_ids`` (B,), every text sharing row i's id is a positive too: each row's
    target spreads uniformly over its positives (the multi-positive cross-entropy of
    supervised-contrastive / UniCL training); with distinct ids this is CLIP's loss exactly."""
    logits = logit_scale * image @ text.T  # (B, B)
    if positive_ids is not None:
        pos = positives_from_ids(positive_ids)
        if not bool(pos.fill_diagonal_(False).any()):  # all distinct: the one-hot case below
            positive_ids = None
    if positive_ids is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    target = positives_from_ids(positive_ids).to(logits.dtype)
    target = target / target.sum(1, keepdim=True)  # symmetric relation: rows and columns alike
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def mpm_soft_labels(positives: torch.Tensor, eps: float) -> torch.Tensor:
    """y~_ij = (1 - eps) y_ij / |P(i)| + eps (1 - y_ij) / (B - |P(i)|). positives: (B, B) bool."""
    y = positives.float()
    n_pos = y.sum(1, keepdim=True)  # (B, 1)
    n_neg = (y.shape[1] - n_pos).clamp_min(1)
    if bool((n_pos == 0).any()):
        raise ValueError("MPM-NCE: every sample needs at least one positive (its own pair)")
    return (1 - eps) * y / n_pos + eps * (1 - y) / n_neg


def mpm_nce(image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None = None, eps: float = 0.1,
            delta: float = 0.05, tau: float = 0.01, positive_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-positive NCE (R-Adapter): soft labels over several positives (smoothing eps), an
    additive margin delta on the negatives' similarities, fixed temperature tau.
    image, text: (B, D); positives: (B, B) bool, positives[i, j] = text j describes image i,
    or ``positive_ids`` (B,): samples sharing an image id (or a class id) are positives."""
    if positives is None:
        if positive_ids is None:
            raise ValueError("mpm_nce needs positives (B, B) or positive_ids (B,)")
        positives = positives_from_ids(positive_ids)
    sim = image @ text.T  # (B, B)
    logits = (sim + delta * (~positives).to(sim.dtype)) / tau
    i2t = -(mpm_soft_labels(positives, eps) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(mpm_soft_labels(positives.T, eps) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Captioning / causal LM loss: position t predicts labels[t + 1]. logits: (B, T, V)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------- masked image modelling


def random_patch_mask(batch: int, patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, N) bool, exactly round(ratio * N) patches masked per image, chosen uniformly."""
    n_mask = int(round(ratio * patches))
    noise = torch.rand(batch, patches, generator=generator).to(device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, patches, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :n_mask], True)
    return mask


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mim_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int,
             norm_pix: bool = True) -> torch.Tensor:
    """L1 between predicted and true pixels of the masked patches; with ``norm_pix`` each
    target patch is normalised by its own mean and std (MAE). pred: (B, N, p*p*C)."""
    target = patchify(images, patch)
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target.float()).abs().mean(-1)  # (B, N)
    m = mask.float()
    return (per_patch * m).sum() / m.sum().clamp_min(1)


# ---------------------------------------------------------------- masked language modelling


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], prob: float = 0.15, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each real, non-special token is picked with ``prob``; of those 80% become
    ``mask_id``, 10% a random token, 10% stay. Returns (masked ids, labels with -100 elsewhere).
    At least one token per row is picked, so every row has a target."""
    device = input_ids.device
    can = attention_mask.bool()
    for s in special_ids:
        can &= input_ids != s
    pick = (torch.rand(input_ids.shape, generator=generator).to(device) < prob) & can
    none = ~pick.any(1) & can.any(1)
    if bool(none.any()):  # force one pick in rows that drew none
        first = (can.float() + torch.rand(input_ids.shape, generator=generator).to(device)).argmax(1)
        pick[none, first[none]] = True
    labels = input_ids.masked_fill(~pick, IGNORE_INDEX)
    roll = torch.rand(input_ids.shape, generator=generator).to(device)
    masked = input_ids.clone()
    masked[pick & (roll < 0.8)] = mask_id
    rand_pos = pick & (roll >= 0.8) & (roll < 0.9)
    masked[rand_pos] = torch.randint(vocab_size, input_ids.shape, generator=generator).to(device)[rand_pos]
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the picked positions only. logits: (B, T, V); labels: (B, T)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def mlm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    picked = labels != IGNORE_INDEX
    return float((logits.argmax(-1)[picked] == labels[picked]).float().mean()) if picked.any() else 0.0


# ---------------------------------------------------------------- image-text matching


def hard_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives from the contrastive similarities (ALBEF / VLMo): for image i a text j
    drawn with probability softmax_j(sim_ij) over its non-positives, and for text j an image
    likewise. sim, positives: (B, B). Returns (text index per image, image index per text)."""
    def draw(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        w = F.softmax(s.float(), dim=1).masked_fill(pos, 0.0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, (~pos).float())  # all-positive rows: uniform
        w = w + (w.sum(1, keepdim=True) == 0).float()  # no negative at all: any index
        return torch.multinomial(w, 1, generator=generator).squeeze(1)
    with torch.no_grad():
        return draw(sim, positives), draw(sim.T, positives.T)


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Binary matching as 2-way CE: matched pairs label 1, hard negatives label 0.
    pos_logits: (B, 2); neg_logits: (M, 2)."""
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat([torch.ones(len(pos_logits)), torch.zeros(len(neg_logits))]).long().to(logits.device)
    return F.cross_entropy(logits.float(), labels)
