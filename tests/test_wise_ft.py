"""WiSE-FT against the stored pretrained weights (dodo/eval/wise.py): theta(alpha) =
(1 - alpha) theta_0 + alpha theta_ft for full fine-tuning and every adapter type; alpha = 0 is
the zero-shot model exactly, alpha = 1 the tuned one; the full fine-tuning curve moves; R-Adapter's
point at alpha is its re-scaled merge with coefficient alpha. End to end: a 2-rank full
fine-tuning run stores theta_0 once and `dodo eval RUN --wise` reproduces the run's initial and
final held-out metrics at the curve's ends."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import dodo, run_dirs
from dodo.adapters.config import AdapterConfig
from dodo.adapters.r_adapter import RAdapterLinear
from dodo.adapters.state import adapter_state_dict, load_adapter_state, wise_state
from dodo.eval.wise import PRETRAINED_FILE, load_pretrained_state, save_pretrained_state, wise_curve, wise_zero_point
from dodo.models.clip.config import ClipConfig, ClipModelConfig
from dodo.models.clip.model import ClipDualEncoder
from test_adapters import ALL_KINDS, clip_batch, clip_features

KINDS = {"full": AdapterConfig(kind="none"), **{k: ALL_KINDS[k] for k in ("lora", "bottleneck", "r_adapter", "film")}}


def build(kind: str, seed: int = 0) -> ClipDualEncoder:
    torch.manual_seed(seed)
    clip = ClipConfig(trainable=["all"] if kind == "full" else ["temperature"])
    return ClipDualEncoder(ClipModelConfig(adapter=copy.deepcopy(KINDS[kind]), clip=clip), 40, 0).double().eval()


def train_a_little(model: torch.nn.Module, seed: int = 3) -> None:
    """Stand-in for training: move every trainable tensor (adapters, or all weights) and the
    R-Adapter EMA buffers away from the start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        for m in model.modules():
            if isinstance(m, RAdapterLinear):
                for name in ("weight", "scale"):
                    getattr(m, f"ema_{name}").copy_(getattr(m, name) * 0.9)


@pytest.mark.parametrize("kind", list(KINDS))
def test_wise_ends_are_zero_shot_and_tuned(kind, tmp_path: Path):
    batch = clip_batch()
    model = build(kind)
    assert save_pretrained_state(tmp_path, model) is not None
    zero_shot = clip_features(build("full"), batch)  # the frozen model: no adapters, start weights
    train_a_little(model)
    assert save_pretrained_state(tmp_path, model) is None  # a resume never overwrites theta_0
    tuned = clip_features(model, batch)
    theta0 = wise_zero_point(model, load_pretrained_state(tmp_path))
    seen: list[torch.Tensor] = []
    rows = wise_curve(model, lambda m: seen.append(clip_features(m, batch)) or {}, [0.0, 0.5, 1.0], theta0)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    torch.testing.assert_close(seen[0], zero_shot, rtol=0, atol=1e-12)  # alpha = 0: zero-shot, exactly
    torch.testing.assert_close(seen[2], tuned, rtol=0, atol=1e-12)  # alpha = 1: tuned
    assert (seen[1] - seen[0]).abs().max() > 1e-4 and (seen[1] - seen[2]).abs().max() > 1e-4  # it moves
    torch.testing.assert_close(clip_features(model, batch), tuned, rtol=0, atol=0)  # restored


def test_full_finetuning_curve_is_flat_without_stored_weights_and_linear_with_them(tmp_path: Path):
    """The regression: without theta_0 every point is the tuned model; with it, the weights at
    alpha are exactly the interpolation of the stored and the tuned ones."""
    model = build("full")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    save_pretrained_state(tmp_path, model)
    train_a_little(model)
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = wise_curve(model, lambda m: {"w": float(m.clip.text_projection.weight[0, 0].detach())}, [0.0, 0.25, 1.0],
                     wise_zero_point(model, load_pretrained_state(tmp_path)))
    w0, w1 = float(start["clip.text_projection.weight"][0, 0]), float(tuned["clip.text_projection.weight"][0, 0])
    assert [r["w"] for r in got] == pytest.approx([w0, 0.75 * w0 + 0.25 * w1, w1], abs=1e-12)
    flat = wise_curve(model, lambda m: {"w": float(m.clip.text_projection.weight[0, 0].detach())}, [0.0, 1.0])
    assert flat[0]["w"] == flat[1]["w"] == w1


@pytest.mark.parametrize("ema", [False, True])
def test_r_adapter_wise_point_is_the_rescaled_merge(ema, tmp_path: Path):
    """At WiSE alpha a, R-Adapter equals W_org (I + a s~ W~_adp) merged: the paper's re-scaling."""
    batch = clip_batch()
    model = build("r_adapter")
    for m in model.modules():
        if isinstance(m, RAdapterLinear):
            m.use_ema, m.alpha = ema, 0.8  # the configured alpha is set aside during the curve
    save_pretrained_state(tmp_path, model)
    train_a_little(model)
    seen = []
    wise_curve(model, lambda m: seen.append(clip_features(m, batch)) or {}, [0.3],
               wise_zero_point(model, load_pretrained_state(tmp_path)))
    merged = copy.deepcopy(model)
    for m in merged.modules():
        if isinstance(m, RAdapterLinear):
            m.alpha = 0.3
            m.merge()
    torch.testing.assert_close(seen[0], clip_features(merged, batch), rtol=0, atol=1e-10)
    assert all(m.alpha == 0.8 for m in model.modules() if isinstance(m, RAdapterLinear))


def test_stored_state_that_does_not_fit_is_refused(tmp_path: Path):
    save_pretrained_state(tmp_path, build("lora"))  # adapters only: no base weights stored
    with pytest.raises(ValueError, match="lacks"):
        wise_zero_point(build("full"), load_pretrained_state(tmp_path))


SMALL = ["data.num_train=384", "data.num_eval=64", "eval.num_ood=64", "train.steps=30", "train.save_every=30",
         "train.eval_every=1000", "train.log_every=10", "eval.knn_bank=128", "model.adapter.kind=none",
         "model.clip.trainable=[all]", "train.lr=3e-4", "eval.wise_alphas=[0.0,0.5,1.0]", "eval.weightwatcher=true"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_full_finetuning_run_stores_theta0_and_its_wise_curve_moves(workdir: Path):
    out = dodo("submit", "jobs/clip_r_adapter.yaml", *SMALL, f"runs_dir={workdir}/runs", cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stdout
    (run,) = run_dirs(workdir / "runs", "clip_r_adapter")
    assert (run / PRETRAINED_FILE).is_file()
    summary = json.loads((run / "summary.json").read_text())
    first, last = summary["initial"], summary["final"]
    assert 1.0 < last["weightwatcher.alpha_mean"] < 20.0 and (run / "weightwatcher_layers.json").is_file()
    ev = dodo("eval", str(run), "--wise", "--weightwatcher", cwd=workdir, timeout=600)
    rows = json.loads((run / "eval" / "wise.json").read_text())["rows"]
    print(ev.stdout)
    ww = json.loads((run / "eval" / "weightwatcher.json").read_text())  # the same tuned weights as the summary's
    assert ww["weightwatcher.alpha_mean"] == pytest.approx(last["weightwatcher.alpha_mean"], abs=1e-6)
    assert (run / "eval" / "weightwatcher_layers.json").is_file()
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    for key in ("id.r_mean", "ood.r_mean"):
        assert rows[0][key] == pytest.approx(first[f"eval.{key}"], abs=1e-6)  # alpha 0: the zero-shot model
        assert rows[2][key] == pytest.approx(last[f"eval.{key}"], abs=1e-6)  # alpha 1: the tuned model
    assert rows[2]["id.r_mean"] > rows[0]["id.r_mean"] + 0.1  # the curve is not flat
