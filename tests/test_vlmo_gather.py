"""VLMo's ITC over all-gathered features and global hard-negative mining: 2 gloo ranks, each
holding half of a global batch, give the loss (mean over ranks) and the gradients (averaged
over ranks, as DeepSpeed does) of one process on the whole global batch. Captions of the two
ranks have other lengths (padding across ranks), two captions share an image (positives
across ranks), and the hard negatives may come from the other rank."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dodo import losses

pytestmark = [pytest.mark.multiprocess]
slow = pytest.mark.slow  # two spawned ranks: ~10 s CPU, more wall time on a busy machine

B, T, VOCAB, SEED = 8, 7, 50, 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from dodo.adapters.config import AdapterConfig
    from dodo.models import build_model
    from dodo.models.vlmo.config import VlmoConfig, VlmoModelConfig

    torch.manual_seed(0)
    cfg = VlmoModelConfig(adapter=AdapterConfig(kind="none"),
                          vlmo=VlmoConfig(hidden=32, layers=3, heads=4, vlffn_start=2, vl_itc_weight=1.0,
                                          max_text_len=12, init_temperature=0.5))
    return build_model(cfg, vocab_size=VOCAB, eos_token_id=1, mask_token_id=2).train()


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[B // 2:, 5:] = 0  # rank 1's captions are 5 tokens: its own batch is narrower
    ids[B // 2:, 5:] = 1
    mask[0, 6:] = 0
    image_ids = torch.arange(B)
    image_ids[B // 2] = image_ids[1]  # rank 0's row 1 and rank 1's row 0: one image
    return {"images": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "image_ids": image_ids}


def _step(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(SEED)  # the hard negatives' seed: rank 0's draw, broadcast
    loss = model(**batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        batch = _global_batch()
        half = slice(rank * B // 2, (rank + 1) * B // 2)
        local = {k: v[half] for k, v in batch.items()}
        width = int(local["attention_mask"].sum(1).max())  # as the collator pads: to the longest caption
        local["input_ids"], local["attention_mask"] = local["input_ids"][:, :width], local["attention_mask"][:, :width]
        loss, grads = _step(_model(), local)
        mean = torch.tensor([loss])
        dist.all_reduce(mean)
        for g in grads.values():  # DeepSpeed's data-parallel average
            dist.all_reduce(g)
            g /= 2
        if rank == 0:
            torch.save({"loss": float(mean) / 2, "grads": grads}, out)
        # Both ranks done with every collective before either tears gloo down: a rank destroying
        # its group while the other still uses the pair aborted the process ("terminate called
        # without an active exception") once in CI on a loaded machine.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@slow
def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path: Path):
    out = tmp_path / "two.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    one_loss, one_grads = _step(_model(), _global_batch())
    assert two["loss"] == pytest.approx(one_loss, rel=1e-5, abs=1e-6)
    assert set(two["grads"]) == set(one_grads)
    for name, g in one_grads.items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    # Every part of the objective contributed (ITC, the VL head, ITM's fusion path).
    for name in ("itc_image.weight", "itc_vl_text.weight", "itm_head.weight", "blocks.2.experts.vl.fc1.weight"):
        assert one_grads[name].abs().sum() > 0, name


def test_local_itc_on_one_rank_is_info_nce():
    from dodo.models.vlmo.gather import local_itc

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    torch.testing.assert_close(local_itc(img, txt, img, txt, 5.0, 0), losses.info_nce(img, txt, 5.0))
    torch.testing.assert_close(local_itc(img, txt, img, txt, 5.0, 0, losses.positives_from_ids(ids)),
                               losses.info_nce(img, txt, 5.0, positive_ids=ids))
    # Rows of "rank 1" of a world of 2: half the one-process loss's rows, both directions.
    halves = [local_itc(img[r * 3:(r + 1) * 3], txt[r * 3:(r + 1) * 3], img, txt, 5.0, r) for r in (0, 1)]
    torch.testing.assert_close(sum(halves) / 2, losses.info_nce(img, txt, 5.0))
