"""DeepSpeed config generation, precision choice and the LR schedule."""

from __future__ import annotations

import pytest
import torch

from dodo.config.loader import load_job
from dodo.distributed.engine import deepspeed_config, lr_lambda, param_groups, resolve_precision
from conftest import REPO


def demo(*overrides: str):
    return load_job(REPO / "jobs/demo.yaml", list(overrides))


def test_deepspeed_config_from_dodo_config():
    cfg = demo("train.micro_batch=4", "train.grad_accum=3", "deepspeed.zero_stage=1", "train.grad_clip=0.5")
    ds = deepspeed_config(cfg, world_size=6, precision="fp32")
    assert ds["train_batch_size"] == 4 * 3 * 6
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.5
    assert "fp16" not in ds and "bf16" not in ds


def test_fp16_gets_dynamic_loss_scaling_and_bf16_none():
    cfg = demo()
    fp16 = deepspeed_config(cfg, 2, "fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16
    assert deepspeed_config(cfg, 2, "bf16")["bf16"] == {"enabled": True}


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_by_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_precision_refusals():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("bf16", torch.device("cpu"))


def test_bf16_refused_on_v100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.raises(ValueError, match="sm_80"):
        resolve_precision("bf16", torch.device("cuda", 0))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = demo("train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1")
    f = lr_lambda(cfg)
    warm = [f(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 101)]
    assert decay == sorted(decay, reverse=True)


def test_only_trainable_parameters_reach_the_optimizer():
    from dodo.tasks import build_task

    cfg = demo("model.image_encoder.trainable=true", "model.image_encoder.lr=1e-5")
    model = build_task(cfg).model
    groups = param_groups(model, cfg)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert groups[1]["lr"] == 1e-5 and groups[0]["lr"] == cfg.train.lr
