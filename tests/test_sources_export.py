"""`dodo export`: a tiny 2-rank LoRA run, exported as a PEFT adapter (loaded by peft itself) and
as a merged Hugging Face directory; bad input leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, dodo, run_dirs

LORA = ["model.adapter.kind=lora", "model.adapter.locations=[attention,mlp]",
        "model.adapter.lora.targets=[c_attn,c_fc]"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_export_peft_and_merged(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dodo.config.loader import load_job
    from dodo.tasks import build_task
    from dodo.train.init_from import read_init

    dodo("submit", "jobs/demo.yaml", *TINY, *LORA, "train.steps=3", cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", "demo")
    out = workdir / "exported"
    proc = dodo("export", str(run), "--format", "peft", "--out", str(out), cwd=workdir, timeout=300)
    assert f"peft: {out / 'lm'}" in proc.stdout
    cfg = json.loads((out / "lm" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True  # GPT-2's Conv1D
    merged = workdir / "merged"
    dodo("export", str(run), "--format", "merged", "--out", str(merged), cwd=workdir, timeout=300)

    # The run's LM rebuilt with its trained adapters, as `dodo export` rebuilt it.
    monkeypatch.chdir(workdir)  # the job's relative data cache path, as the run saw it
    job = load_job(run / "config.yaml")
    torch.manual_seed(job.model.init_seed)
    model = build_task(job, read_init(job)).model
    state = torch.load(sorted((run / "checkpoints").glob("*/mp_rank_00_model_states.pt"))[-1],
                       map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(state, strict=False)
    lm = model.lm.eval()
    ids = torch.randint(1, lm.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lm(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged / "lm")).eval()(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # PEFT on the merged-free base: the base is the frozen random LM, saved here for PEFT
        base_dir = workdir / "base"
        import copy
        from dodo.adapters.peft_io import _adapters
        plain = copy.deepcopy(lm)
        for name, m in _adapters(plain).items():
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, m.base)
        plain.save_pretrained(str(base_dir))
        peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out / "lm"))
        assert torch.equal(peft_lm.eval()(input_ids=ids).logits, want)
    # bad input: an existing non-empty --out, an unknown run; nothing written
    bad = dodo("export", str(run), "--format", "peft", "--out", str(out), cwd=workdir, check=False, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not an empty directory" in bad.stderr



def test_merged_export_of_a_fully_fine_tuned_model(tmp_path: Path):
    """Full fine-tuning places no adapters: `--format merged` writes the tuned model itself (the
    stand-in "pretrained CLIP" of docs/results.md is made this way); PEFT format still refuses."""
    from torch import nn
    from transformers import CLIPModel, CLIPConfig

    from dodo.adapters.peft_io import PeftFormatError, export_merged, merged_copy
    from dodo.export import adapted_hf_models

    cfg = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8),
                     vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=8)
    holder = nn.Module()
    holder.clip = CLIPModel(cfg)
    holder.clip.requires_grad_(False)
    holder.clip.logit_scale = nn.Parameter(holder.clip.logit_scale.detach().reshape(1), requires_grad=False)  # as dodo's CLIP holds it
    assert adapted_hf_models(holder, tuned=True) == {}  # frozen and adapter-free: nothing to export
    holder.clip.text_projection.weight.requires_grad_(True)
    with torch.no_grad():
        holder.clip.text_projection.weight.add_(1.0)  # "trained"
    assert list(adapted_hf_models(holder, tuned=True)) == ["clip"] and adapted_hf_models(holder) == {}
    with pytest.raises(PeftFormatError, match="no adapters"):
        merged_copy(holder.clip)
    export_merged(holder.clip, tmp_path / "clip", plain_ok=True)
    loaded = CLIPModel.from_pretrained(str(tmp_path / "clip"))
    for (name, want), got in zip(holder.clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got.reshape(want.shape), want), name
    assert loaded.logit_scale.shape == ()  # CLIPModel's own shape, so from_pretrained loads it
