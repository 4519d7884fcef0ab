"""VLMo's fine-tuning heads on the fusion encoder's pooled [T_CLS] (as VLMo and ViLT build them).

VQA: pooled (B, d) -> Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, answers); trained as
     multi-label classification with BCE against VQA v2's soft scores (min(1, #annotators who
     gave the answer / 3)), the mean BCE times the number of answers (ViLT / VLMo's
     ``compute_vqa``: a sum over answers, averaged over questions).
NLVR2: one text, two images: the text fused with each image ("pair" setting), the two pooled
     vectors concatenated (B, 2d) -> Linear(2d, 2d) -> LayerNorm -> GELU -> Linear(2d, 2);
     cross-entropy on the true / false label.
The pooler is the model's ITM pooler (tanh(Linear) of the fused [T_CLS]), shared as in VLMo.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def classifier(d_in: int, n_out: int) -> nn.Sequential:
    """(B, d_in) -> (B, n_out): Linear(d_in, 2 d_in) -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, 2 * d_in), nn.LayerNorm(2 * d_in), nn.GELU(), nn.Linear(2 * d_in, n_out))


class VqaHead(nn.Module):
    def __init__(self, d: int, answers: int):
        super().__init__()
        self.mlp = classifier(d, answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, answers) logits
        return self.mlp(pooled)


def vqa_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """logits, scores: (B, answers); scores are VQA soft scores in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), scores.float()) * scores.shape[1]


def vqa_score(logits: torch.Tensor, scores: torch.Tensor) -> float:
    """VQA accuracy: the soft score of the top answer, averaged over questions."""
    return float(scores.gather(1, logits.argmax(1, keepdim=True)).mean())


class Nlvr2Head(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = classifier(2 * d, 2)

    def forward(self, pooled_1: torch.Tensor, pooled_2: torch.Tensor) -> torch.Tensor:
        """(B, d) x 2 -> (B, 2) logits (column 1 = the statement is true of the image pair)."""
        return self.mlp(torch.cat([pooled_1, pooled_2], dim=-1))
