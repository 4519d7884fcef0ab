"""MAGMA captioning with every adapter kind: builds, freezes the base, learns a few steps."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from dodo.config.loader import load_job
from dodo.models import build_model

EXTRA = {
    "lora": ["model.adapter.locations=[attention,mlp]", "model.adapter.lora.targets=[c_attn,c_fc]"],
    "prefix": ["model.adapter.prefix.length=4", "model.adapter.prefix.bottleneck=32"],
    "mam": ["model.adapter.placement=parallel", "model.adapter.prefix.length=4", "model.adapter.prefix.bottleneck=32"],
    "film": ["model.adapter.film.condition=image"],
    "r_adapter": ["model.adapter.locations=[attention,mlp]"],
    "bottleneck": ["model.adapter.placement=scaled_parallel"],
}


@pytest.mark.parametrize("kind", list(EXTRA))
def test_magma_with_each_adapter_learns_and_keeps_base(kind):
    torch.manual_seed(0)
    cfg = load_job(REPO / "jobs/demo.yaml", [f"model.adapter.kind={kind}", "model.lm.d_model=32", "model.lm.n_head=2",
                                      "model.image_encoder.hidden=32", "model.image_encoder.n_layer=1",
                                      *EXTRA[kind]])
    model = build_model(cfg.model, vocab_size=40, eos_token_id=0)
    assert model.adapted_modules
    frozen = {n: p.detach().clone() for n, p in model.lm.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 32, 32, generator=g)
    ids = torch.randint(3, 40, (6, 8), generator=g)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(8):
        loss = model(images, ids, mask)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first
    for n, p in model.lm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    model.eval()
    assert len(model.generate(images[:2], max_tokens=3)) == 2
