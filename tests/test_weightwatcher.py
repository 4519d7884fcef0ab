"""WeightWatcher's layer alpha (dodo/eval/weightwatch.py, the `weightwatcher` package) on layers
with a known spectrum, and on a model (merged linear adapters, names, the summary metrics).

A known spectrum: W = U diag(sqrt(lambda)) V^T with orthonormal U, V, so the eigenvalues of
W^T W are exactly lambda, placed at the quantiles of a Pareto law p(lambda) ~ lambda^-a on
[1, inf): lambda_i = (1 - q_i)^(-1 / (a - 1)), q_i = (i + 1/2) / k. The package fits
p ~ lambda^-alpha to the tail above its xmin by maximum likelihood (powerlaw). For k i.i.d.
Pareto draws the MLE's standard error is (a - 1) / sqrt(k) (0.1 for a = 3, k = 400); on exact
quantiles the sampling noise is gone and what remains is the discretisation and the xmin choice,
measured here at < 0.03 (a = 2.5 .. 4, k = 150 .. 300): the tolerance 0.1 allows that with room,
and still separates exponents 0.5 apart (the test checks both).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dodo.eval.weightwatch import analyze, fit_alphas, metrics, report


def power_law_matrix(a: float, n: int, m: int, seed: int = 0) -> torch.Tensor:
    """(n, m) with the eigenvalues of W^T W at the Pareto(a) quantiles (see the module doc)."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, m)
    q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    lam = (1 - q) ** (-1.0 / (a - 1))
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return (u @ torch.diag(lam.sqrt()) @ v.T).float()


def test_alpha_of_known_power_law_spectra():
    mats = {"a25": power_law_matrix(2.5, 300, 200), "a3": power_law_matrix(3.0, 200, 300, seed=1),
            "a4": power_law_matrix(4.0, 150, 150, seed=2)}
    rows = {r["layer"]: r for r in fit_alphas(mats)}
    assert set(rows) == set(mats)
    for name, want in (("a25", 2.5), ("a3", 3.0), ("a4", 4.0)):
        assert rows[name]["alpha"] == pytest.approx(want, abs=0.1), rows[name]
    assert rows["a25"]["alpha"] < rows["a3"]["alpha"] < rows["a4"]["alpha"]


def test_model_layers_merged_adapters_and_report(tmp_path):
    from dodo.adapters.config import AdapterConfig, LoRAConfig
    from dodo.adapters.lora import LoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    with torch.no_grad():
        model[0].weight.copy_(power_law_matrix(3.0, 96, 64))
    plain = {r["layer"]: r["alpha"] for r in analyze(model)}
    assert set(plain) == {"0", "2"} and plain["0"] == pytest.approx(3.0, abs=0.15)
    # A LoRA on layer 2 with a large update: the fit sees the merged weight, then it is unmerged.
    cfg = AdapterConfig(kind="lora", lora=LoRAConfig(r=8, alpha=8.0))
    model[2] = LoRALinear(model[2], cfg.lora)
    with torch.no_grad():
        model[2].lora_B.weight.normal_(0, 2.0)
    before = model[2].base.weight.detach().clone()
    merged = {r["layer"]: r["alpha"] for r in analyze(model)}
    assert set(merged) == {"0", "2.base"} and merged["2.base"] != pytest.approx(plain["2"], abs=1e-3)
    torch.testing.assert_close(model[2].base.weight.detach(), before)  # unmerged (LoRA subtracts: not bitwise)
    assert not model[2].merged
    found, lines = report(model, tmp_path)
    table = json.loads((tmp_path / "weightwatcher_layers.json").read_text())
    assert [r["layer"] for r in table] == ["0", "2.base"] and found["weightwatcher.layers"] == 2.0
    assert found["weightwatcher.alpha_mean"] == pytest.approx(sum(merged.values()) / 2) and "alpha_mean" in lines[0]
    assert math.isnan(metrics([])["weightwatcher.alpha_mean"])


def test_missing_package_is_refused_at_config_time(monkeypatch):
    import importlib.util

    from dodo.config.errors import ConfigValueError
    from dodo.eval.config import EvalConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "weightwatcher" else real(name, *a))
    with pytest.raises(ConfigValueError, match="pip install weightwatcher"):
        EvalConfig(weightwatcher=True)
    EvalConfig(weightwatcher=False)  # off: never looked up
