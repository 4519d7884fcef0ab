"""PEFT interop through the real `peft` library: dodo LoRA -> PEFT files -> PeftModel gives the
same logits; a PeftModel's saved adapter -> dodo gives the same logits; the merged export is a
Hugging Face directory equal to PEFT's merge_and_unload. Tolerances: LoRA forward exact in fp32
(the same ops in the same order); merged weights atol 1e-5 (W + BA is rounded once more)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

from dodo.adapters.config import AdapterConfig, LoRAConfig
from dodo.adapters.inject import inject_adapters
from dodo.adapters.peft_io import PeftFormatError, export_merged, export_peft, load_peft

V = 101
IDS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


def _base(tmp_path, arch: str) -> str:
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers: PEFT's fan_in_fan_out
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    else:
        m = tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                             rotary_dim=8))
    m.save_pretrained(str(tmp_path / "base"))
    return str(tmp_path / "base")


def _load(path: str) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
@pytest.mark.parametrize("arch,targets", [("gpt2", ["c_attn", "c_fc"]), ("gptj", ["q_proj", "v_proj", "fc_out"])])
def test_dodo_lora_to_peft_and_back(tmp_path, arch, targets):
    base = _base(tmp_path, arch)
    lm = _load(base)
    inject_adapters(lm, AdapterConfig(kind="lora", locations=["attention", "mlp"],
                                      lora=LoRAConfig(r=4, alpha=8.0, targets=targets)), 32)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.5)  # a trained adapter, not the zero init
    want = lm(IDS).logits
    out = export_peft(lm, tmp_path / "adapter", base_model_name_or_path=base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(_load(base), str(out)).eval()
    assert torch.equal(peft_model(input_ids=IDS).logits, want)
    # and back into dodo from the files PEFT itself writes
    peft_model.save_pretrained(str(tmp_path / "resaved"))
    lm2 = _load(base)
    names = load_peft(lm2, tmp_path / "resaved")
    assert len(names) == len(cfg["target_modules"])
    assert torch.equal(lm2(IDS).logits, want)
    # merged export: a plain HF directory, equal to PEFT's merge_and_unload
    export_merged(lm, tmp_path / "merged")
    merged = _load(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    reference = peft_model.merge_and_unload()
    for (n, a), (m, b) in zip(merged.state_dict().items(), reference.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged(IDS).logits, want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_peft_trained_adapter_loads_into_dodo(tmp_path):
    base = _base(tmp_path, "gptj")
    torch.manual_seed(3)
    peft_model = get_peft_model(_load(base), LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "fc_in"],
                                                        use_rslora=True)).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(std=0.5)
    want = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(str(tmp_path / "a"))
    lm = _load(base)
    load_peft(lm, tmp_path / "a")
    torch.testing.assert_close(lm(IDS).logits, want, atol=1e-6, rtol=1e-6)  # rsLoRA: alpha*sqrt(r) rescaled


def test_unexpressible_adapters_are_refused(tmp_path):
    lm = _load(_base(tmp_path, "gptj"))
    inject_adapters(lm, AdapterConfig(kind="bottleneck"), 32)
    with pytest.raises(PeftFormatError, match="PEFT has no adapter type for AdaptedSublayer"):
        export_peft(lm, tmp_path / "x")
    with pytest.raises(PeftFormatError, match="cannot be merged"):
        export_merged(lm, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(PeftFormatError, match="no adapter_config.json"):
        load_peft(lm, tmp_path)
