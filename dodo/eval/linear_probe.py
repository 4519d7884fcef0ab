"""Linear probe: multinomial logistic regression on frozen, L2-normalised image features.

scikit-learn's LogisticRegression (L-BFGS, L2 penalty of strength 1 / C), as CLIP's linear-probe
evaluation uses it: a field-standard solver with a tested stopping rule, rather than a torch
loop of our own. Features are computed by the model (torch), the fit runs on CPU in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                c: float = 1.0, max_iter: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), class probabilities (N, C)) for the test features."""
    from sklearn.linear_model import LogisticRegression

    x = F.normalize(train_feats.double(), dim=-1).numpy()
    clf = LogisticRegression(C=c, max_iter=max_iter)
    clf.fit(x, train_labels.numpy())
    t = F.normalize(test_feats.double(), dim=-1).numpy()
    return clf.predict(t), clf.predict_proba(t)


def probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   test_labels: torch.Tensor, c: float = 1.0, max_iter: int = 1000) -> float:
    pred, _ = fit_predict(train_feats, train_labels, test_feats, c, max_iter)
    return float((pred == test_labels.numpy()).mean())


@torch.no_grad()
def run_linear_probe(encode_images, train_set, test_set, c: float = 1.0, max_iter: int = 1000,
                     bank: int = 0, limit: int = 0, batch_size: int = 128) -> dict[str, float]:
    """The linear_probe suite: fit on ``bank`` (0: all) training images, top-1 on the test set."""
    from dodo.eval.retrieval import embed_images
    from dodo.eval.zeroshot import labelled_images

    tr_img, tr_lab = labelled_images(train_set, bank)
    te_img, te_lab = labelled_images(test_set, limit)
    if len(set(tr_lab.tolist())) < 2:
        raise ValueError("the linear probe needs at least two classes among its training images")
    tr, te = embed_images(encode_images, tr_img, batch_size), embed_images(encode_images, te_img, batch_size)
    return {"top1": probe_accuracy(tr, tr_lab, te, te_lab, c, max_iter)}
