"""Dispatch rules, torch.compile tracing through the custom ops, and the package's import name."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from kernel_testing import DEVICE, assert_close, leaves

import dodo_kernels
from dodo_kernels import KernelUnavailable, bottleneck_adapter, lora, lora_reference, route_topk

REPO = Path(__file__).resolve().parents[1]


def test_auto_on_cpu_is_the_reference_bit_for_bit(monkeypatch):
    monkeypatch.setenv("DODO_KERNELS", "auto")
    x, a, b = torch.randn(8, 16), torch.randn(4, 16), torch.randn(12, 4)
    assert torch.equal(lora(x, a, b, None, 0.5), lora_reference(x, a, b, None, 0.5))
    assert not dodo_kernels.use_triton(x)


def test_forced_triton_without_gpu_or_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("DODO_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailable, match="need CUDA, or TRITON_INTERPRET=1.*DODO_KERNELS=auto"):
        route_topk(torch.randn(4, 3), 1)


def test_bad_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("DODO_KERNELS", "fast")
    with pytest.raises(ValueError, match="DODO_KERNELS='fast' is not one of auto, triton, reference"):
        lora(torch.randn(2, 16), torch.randn(1, 16), torch.randn(16, 1))


def test_unsupported_shape_falls_back_in_auto_and_errors_when_forced(monkeypatch):
    monkeypatch.setenv("DODO_KERNELS", "triton")
    x, wd, bd, wu, bu = torch.randn(4, 300), torch.randn(150, 300), torch.randn(150), torch.randn(300, 150), torch.randn(300)
    with pytest.raises(KernelUnavailable, match="does not support this shape"):
        bottleneck_adapter(x, wd, bd, wu, bu)


def test_torch_compile_traces_the_custom_ops(monkeypatch):
    monkeypatch.setenv("DODO_KERNELS", "triton")
    torch._dynamo.reset()

    def step(x, a, b, wd, bd, wu, bu):
        h = lora(x, a, b, x, scale=2.0)
        return bottleneck_adapter(h, wd, bd, wu, bu, h, None, "gelu").square().sum()

    tensors = [torch.randn(24, 32), torch.randn(4, 32) * 0.2, torch.randn(32, 4) * 0.2,
               torch.randn(8, 32) * 0.2, torch.randn(8) * 0.2, torch.randn(32, 8) * 0.2, torch.randn(32) * 0.2]
    fast, ref = leaves(*tensors)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(*fast)
    grads = torch.autograd.grad(loss, fast)
    monkeypatch.setenv("DODO_KERNELS", "reference")
    loss_ref = step(*ref)
    assert_close(loss, loss_ref, torch.float32, "loss")
    for gf, gr in zip(grads, torch.autograd.grad(loss_ref, ref)):
        assert_close(gf, gr, torch.float32, "grad")


def test_setup_cfg_lists_every_package():
    from setuptools import find_packages
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = set(find_packages(str(REPO), include=["dodo", "dodo.*"]))
    missing = sorted(found - listed)
    assert not missing, (f"setup.cfg [options] packages misses {missing}: add them (the list is "
                         "explicit because kernels/ installs as dodo_kernels)")
    assert "dodo_kernels" in listed and "kernels" not in listed


def _import_check(pythonpath: str | None, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = ("import importlib.util, dodo_kernels; assert importlib.util.find_spec('kernels') is None, "
            "'kernels importable'; print(dodo_kernels.__file__, dodo_kernels.route_topk.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_name_from_editable_install(tmp_path):
    out = _import_check(None, tmp_path)
    assert "dodo_kernels.router" in out and "/kernels/__init__.py" in out


@pytest.mark.slow
def test_import_name_from_built_wheel(tmp_path):
    wheel_dir = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("dodo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dodo_kernels/__init__.py" in names and "dodo_kernels/triton_moe.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = _import_check(str(site), tmp_path)
    assert str(site / "dodo_kernels") in out


def test_benchmark_says_it_needs_cuda_and_lists_cases():
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the benchmark would measure")
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "bench" / "kernels.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    proc = run()
    assert proc.returncode == 0 and "needs a CUDA GPU" in proc.stdout
    proc = run("--list", "--quick", "--dtypes", "bf16")
    assert proc.returncode == 0 and proc.stdout.count("\n") == 4 and "GFLOP" in proc.stdout
