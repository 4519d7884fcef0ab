"""HF sources: tiny GPT-2 / GPT-Neo / GPT-J (sharded) / CLIP / BERT saved with save_pretrained in
safetensors and bin, loaded through SourceConfig, compared with the model that was saved.
Tolerance: exact (torch.equal) in fp32: the same transformers classes on the same tensors;
bf16 loads compared at 3e-2 (8 mantissa bits). An identity-initialised adapter changes nothing."""

from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

from dodo.adapters.config import AdapterConfig, LoRAConfig
from dodo.adapters.inject import inject_adapters
from dodo.config.errors import ConfigError
from dodo.models.sources.config import SourceConfig, check_source
from dodo.models.sources.hf import check_tokenizer_vocab, load_hf

V = 97
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
LMS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2)),
    "gpt_neo": lambda: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
        vocab_size=V, max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], window_size=4)),
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2,
                                                     n_head=2, rotary_dim=8)),
}


def _save(model: torch.nn.Module, path, **kwargs) -> str:
    model.save_pretrained(str(path), **kwargs)
    return str(path)


@torch.no_grad()
@pytest.mark.parametrize("arch,save", [("gpt2", {}), ("gpt_neo", {"safe_serialization": False}),
                                       ("gptj", {"max_shard_size": "20KB"})])
def test_causal_lm_matches_saved_model(tmp_path, arch, save):
    torch.manual_seed(0)
    ref = LMS[arch]().eval()
    path = _save(ref, tmp_path / arch, **save)
    if arch == "gptj":  # really sharded
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 2
    cfg = SourceConfig(kind="hf", path=path, tower="lm", dtype="float32")
    check_source(cfg)
    lm = load_hf(cfg)
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    want = ref(IDS).logits
    assert torch.equal(lm(IDS).logits, want)
    # identity-initialised adapters: LoRA (B = 0) and a bottleneck with a zero output layer
    inject_adapters(lm, AdapterConfig(kind="lora", lora=LoRAConfig(r=2, targets=["c_attn", "q_proj", "v_proj",
                                                                             "c_proj", "fc_out"])), 32)
    assert torch.equal(lm(IDS).logits, want)
    bf16 = load_hf(SourceConfig(kind="hf", path=path, tower="lm", dtype="bfloat16"))
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(IDS).logits.float(), want, atol=3e-2, rtol=3e-2)


@torch.no_grad()
def test_bottleneck_identity_adapter_keeps_outputs(tmp_path):
    torch.manual_seed(0)
    ref = LMS["gptj"]().eval()
    lm = load_hf(SourceConfig(kind="hf", path=_save(ref, tmp_path / "j"), tower="lm", dtype="float32"))
    inject_adapters(lm, AdapterConfig(kind="bottleneck", locations=["attention", "mlp"]), 32)
    for name, p in lm.named_parameters():
        if name.endswith(("adapter.up.weight", "adapter.up.bias")):
            p.zero_()
    assert torch.equal(lm(IDS).logits, ref(IDS).logits)


@torch.no_grad()
def test_clip_towers_and_bert_match(tmp_path):
    torch.manual_seed(0)
    clip = tf.CLIPModel(tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2), projection_dim=16)).eval()
    path = _save(clip, tmp_path / "clip")
    images = torch.randn(2, 3, 32, 32)
    vision = load_hf(SourceConfig(kind="hf", path=path, tower="vision", dtype="float32"))
    assert torch.equal(vision(pixel_values=images).last_hidden_state,
                       clip.vision_model(pixel_values=images).last_hidden_state)
    text = load_hf(SourceConfig(kind="hf", path=path, tower="text", dtype="float32"))
    assert torch.equal(text(input_ids=IDS).pooler_output, clip.text_model(input_ids=IDS).pooler_output)
    full = load_hf(SourceConfig(kind="hf", path=path, tower="full", dtype="float32"))
    out, want = full(input_ids=IDS, pixel_values=images), clip(input_ids=IDS, pixel_values=images)
    assert torch.equal(out.logits_per_image, want.logits_per_image)
    bert = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16)).eval()
    got = load_hf(SourceConfig(kind="hf", path=_save(bert, tmp_path / "bert", safe_serialization=False),
                               tower="encoder", dtype="float32"))
    assert torch.equal(got(input_ids=IDS).last_hidden_state, bert(input_ids=IDS).last_hidden_state)


def test_hf_bad_inputs(tmp_path):
    torch.manual_seed(0)
    path = _save(LMS["gpt2"](), tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="does not exist"):
        check_source(SourceConfig(kind="hf", path=str(tmp_path / "missing"), tower="lm"))
    with pytest.raises(ConfigError, match="is a file"):
        check_source(SourceConfig(kind="hf", path=os.path.join(path, "config.json"), tower="lm"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no config.json"):
        check_source(SourceConfig(kind="hf", path=str(tmp_path / "empty"), tower="lm"))
    LMS["gpt2"]().config.save_pretrained(str(tmp_path / "empty"))  # a config without weights
    with pytest.raises(ConfigError, match="holds no weights"):
        check_source(SourceConfig(kind="hf", path=str(tmp_path / "empty"), tower="lm"))
    bigger = LMS["gpt2"]().config
    bigger.n_embd = 64
    bigger.save_pretrained(path)  # config.json now disagrees with the weights
    with pytest.raises(ConfigError, match=r"tensor transformer.h.0.attn.c_attn.bias has shape \(96,\).*expects \(192,\)") as err:
        load_hf(SourceConfig(kind="hf", path=path, tower="lm"))
    assert "\n" not in str(err.value)
    check_tokenizer_vocab(50257, 50400)  # GPT-J's padded embedding
    check_tokenizer_vocab(50258, 50257)  # MAGMA's added <|image|> token, resized later
    with pytest.raises(ConfigError, match="21128 tokens but the LM's embedding has 50400 rows"):
        check_tokenizer_vocab(21128, 50400)  # a Chinese BERT vocabulary with GPT-J
