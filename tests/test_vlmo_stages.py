"""VLMo as its paper trains it: the stages' objectives and what each trains, BEiT block-wise
masking and visual-token targets, stage weights, the VL contrastive head, VQA / NLVR2 heads
(against a plain reference computation), the `standard` switch and the parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from dodo.adapters.config import AdapterConfig
from dodo.config.errors import ConfigError, ConfigValueError
from dodo.config.loader import load_job
from dodo.config.preflight import missing_paths
from dodo.models import build_model
from dodo.models.registry import InitState
from dodo.models.vlmo import pretrain
from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig, backbone_parameters
from dodo.models.vlmo.heads import vqa_loss

D, VOCAB, B, T = 32, 50, 4, 7


def model(weights=None, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    cfg = VlmoModelConfig(adapter=AdapterConfig(kind="none"),
                          vlmo=VlmoConfig(hidden=D, layers=4, heads=4, vlffn_start=2, mim_min_block=2, mim_vocab=64,
                                          **kw))
    return build_model(cfg, VOCAB, 1, 2, InitState(weights=weights)).train()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(3, VOCAB, (B, T), generator=g), mask


def grads_of(m, loss) -> set[str]:
    m.zero_grad()
    loss.backward()
    return {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_block_mask_is_beit_blockwise():
    g = torch.Generator().manual_seed(0)
    m = pretrain.block_mask(64, 14, 0.4, 16, g)  # BEiT's setting: 75 of 196 patches (ours rounds 78.4)
    assert m.shape == (64, 196) and (m.sum(1) <= 78).all() and m.sum(1).float().mean() > 70
    grid = m.view(64, 14, 14)
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    nb = torch.zeros_like(grid)
    nb[:, 1:] |= grid[:, :-1]
    nb[:, :-1] |= grid[:, 1:]
    nb[:, :, 1:] |= grid[:, :, :-1]
    nb[:, :, :-1] |= grid[:, :, 1:]
    assert (nb & grid).sum() > 0.9 * grid.sum()
    assert not torch.equal(m[0], m[1])  # a mask per image


def test_codebook_targets_are_fixed_and_follow_the_pixels():
    a, b = pretrain.RandomCodebook(48, 8, 64, seed=0), pretrain.RandomCodebook(48, 8, 64, seed=0)
    px = torch.randn(2, 16, 48)
    assert torch.equal(a(px), b(px)) and a(px).shape == (2, 16)
    assert a(px).unique().numel() > 4  # many codes in use
    assert torch.equal(a(2 * px), a(px))  # cosine: the patch's pattern, not its contrast
    assert "proj" not in a.state_dict()  # never in a checkpoint: rebuilt from the seed
    imgs = torch.arange(2 * 3 * 16 * 16, dtype=torch.float).view(2, 3, 16, 16)
    p = pretrain.patch_pixels(imgs, 8)  # (B, 4, 192), patch (0, 1) = columns 8..15 of rows 0..7
    torch.testing.assert_close(p[0, 1].view(8, 8, 3).permute(2, 0, 1), imgs[0, :, :8, 8:])


def test_mim_stage_trains_attention_and_the_image_expert_only():
    m = model(stage="mim")
    images, _, _ = batch()
    loss = m(images=images)
    assert loss.ndim == 0 and float(loss.detach()) == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.2)
    got = grads_of(m, loss)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert got == trainable  # every trainable tensor learns; nothing else has requires_grad
    assert all(".experts.text." not in n and ".experts.vl." not in n and not n.startswith(("word_", "text_", "itc_"))
               for n in trainable)
    assert {"blocks.0.attn.q_proj.weight", "blocks.3.experts.image.fc1.weight", "mim_token", "patch_embed.weight"} <= trainable
    # The loss is BEiT's: cross-entropy on the masked patches' visual tokens.
    g = torch.Generator().manual_seed(5)
    loss, acc = m.mim(images, generator=g)
    mask = pretrain.block_mask(B, 4, 0.4, 2, torch.Generator().manual_seed(5))
    tokens = m.codebook(pretrain.patch_pixels(images, 8))
    h = m.run(m.embed_image(images, mask), "image")[:, 1:]
    torch.testing.assert_close(loss, F.cross_entropy(m.mim_head(h[mask]), tokens[mask]))
    assert 0 <= acc <= 1


def test_mlm_stage_freezes_attention_and_the_image_expert():
    m = model(stage="mlm")
    _, ids, mask = batch()
    loss = m(input_ids=ids, attention_mask=mask)
    got = grads_of(m, loss)
    assert got == {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("word_embed", "text_cls", "text_pos", "mlm_head")) or ".experts.text." in n
               for n in got), sorted(got)
    assert "blocks.1.experts.text.fc2.weight" in got
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"blocks.0.attn.q_proj.weight", "blocks.0.gamma_1", "blocks.0.experts.image.fc1.weight"} <= frozen


def test_stage_weights_carry_over_and_other_sizes_are_refused():
    first = model(stage="mim", seed=1)
    with torch.no_grad():
        first.blocks[0].attn.q_proj.weight.add_(1.0)
    state = {n: p.detach().clone() for n, p in first.named_parameters() if p.requires_grad}
    second = model(weights=state, stage="mlm", seed=2)
    assert torch.equal(second.blocks[0].attn.q_proj.weight, first.blocks[0].attn.q_proj.weight)
    assert "mim_head.weight" not in dict(second.named_parameters())  # the pretext head stays behind
    assert "blocks.0.attn.q_proj.weight" in second.loaded
    with pytest.raises(ValueError, match="multiway=true"):
        model(weights=state, stage="mlm", multiway=False)
    with pytest.raises(ValueError, match="other sizes"):
        torch.manual_seed(0)
        build_model(VlmoModelConfig(adapter=AdapterConfig(kind="none"), vlmo=VlmoConfig(hidden=16, heads=4)),
                    VOCAB, 1, 2, InitState(weights=state))


def test_vl_contrastive_head_runs_the_top_blocks_through_the_vl_expert():
    m = model(vl_itc_weight=1.0).eval()
    images, ids, mask = batch()
    x = m.embed_image(images)
    itc, vl = m.encode_pair(x, "image")
    torch.testing.assert_close(itc, m.encode_image(images))  # the dual encoder is unchanged
    h = x
    for i, blk in enumerate(m.blocks):
        h = blk(h, "image" if i < 2 else "vl")
    torch.testing.assert_close(vl, F.normalize(m.itc_vl_image(m.norm(h)[:, 0]), dim=-1))
    got = grads_of(m.train(), m(images, ids, mask))
    assert {"itc_vl_image.weight", "itc_vl_text.weight", "logit_vl_scale", "blocks.3.experts.vl.fc1.weight"} <= got
    with pytest.raises(ConfigValueError, match="vl_itc_weight"):
        VlmoConfig(multiway=False, vl_itc_weight=1.0)


def test_vqa_and_nlvr2_heads_against_a_reference():
    m = model(vqa_answers=10, nlvr2=True).eval()
    images, ids, mask = batch()
    cls = m.fuse(images, ids, mask)[:, 0]  # the fused [T_CLS]
    pooled = torch.tanh(m.itm_pooler(cls))
    ref = m.vqa_head.mlp[3](F.gelu(m.vqa_head.mlp[1](m.vqa_head.mlp[0](pooled))))
    logits = m.vqa_logits(images, ids, mask)
    torch.testing.assert_close(logits, ref)
    scores = torch.zeros(B, 10)
    scores[:, 3], scores[0, 4] = 1.0, 0.3  # VQA v2 soft scores
    ref_loss = -(scores * F.logsigmoid(logits) + (1 - scores) * F.logsigmoid(-logits)).sum(1).mean()
    torch.testing.assert_close(vqa_loss(logits, scores), ref_loss)
    other = images.flip(0)
    pair = m.nlvr2_logits(images, other, ids, mask)
    p2 = torch.tanh(m.itm_pooler(m.fuse(other, ids, mask)[:, 0]))
    torch.testing.assert_close(pair, m.nlvr2_head(pooled, p2), rtol=1e-4, atol=1e-5)
    assert pair.shape == (B, 2)
    m.train()
    got = grads_of(m, vqa_loss(m.vqa_logits(images, ids, mask), scores)
                   + F.cross_entropy(m.nlvr2_logits(images, other, ids, mask), torch.tensor([0, 1, 1, 0])))
    assert {"vqa_head.mlp.3.weight", "nlvr2_head.mlp.0.weight", "blocks.3.experts.vl.fc2.weight"} <= got


def test_standard_switch_shares_one_ffn_and_counts_match_the_paper():
    std, multi = model(multiway=False), model()
    assert all(list(b.experts) == ["shared"] for b in std.blocks)
    images, ids, mask = batch()
    assert "blocks.0.experts.shared.fc1.weight" in grads_of(std, std(images, ids, mask))
    heads = sum(p.numel() for n, p in multi.named_parameters() if n.startswith(("itc_", "itm_", "logit_")))
    for m, multiway in ((std, False), (multi, True)):
        v = m.cfg
        assert sum(p.numel() for p in m.parameters()) - heads == backbone_parameters(v, VOCAB), multiway
    # The paper's sizes (BERT's vocabulary): VLMo-Base 175M, VLMo-Large 562M.
    for job, paper in (("jobs/vlmo_retrieval_base.yaml", 175e6), ("jobs/vlmo_retrieval_large.yaml", 562e6)):
        v = load_job(REPO / job).model.vlmo
        assert backbone_parameters(v, 30522) == pytest.approx(paper, rel=0.01), job
    large = load_job(REPO / "jobs/vlmo_retrieval_large.yaml").model.vlmo
    assert (large.layers, large.hidden, large.heads, large.vlffn_start) == (24, 1024, 16, 21)


def test_stage_config_errors():
    with pytest.raises(ConfigValueError, match="mim, mlm, vl") as err:
        VlmoConfig(stage="beit")
    assert err.value.key == "stage"
    with pytest.raises(ConfigValueError, match="at most|mim_patches|must be in") as err:
        VlmoConfig(stage="mim", mim_min_block=16)  # 16 patches of 8 px on 32 px: at most 6 masked
    assert err.value.key == "mim_min_block"
    with pytest.raises(ConfigError, match="model.vlmo.stage"):
        load_job(REPO / "jobs/vlmo_stage_mim.yaml", ["model.vlmo.stage=beit"])
    cfg = load_job(REPO / "jobs/vlmo_stage_vl.yaml", ["model.vlmo.init_from=/no/such/run"])
    assert any(p.startswith("model.vlmo.init_from='/no/such/run' does not exist") for p in missing_paths(cfg))
