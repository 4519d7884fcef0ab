"""Prompt learning (dodo/models/prompt, dodo/data/fewshot.py): CoOp and structured-prompt text
features against hand-built prompts run through CLIP's own forward, the few-shot draw, the
submit-time refusals, and 2-rank tiny jobs on ImageNet-folder / CIFAR caches that beat their
starting accuracy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import dodo, metrics, run_dirs
from data_helpers import make_cache, write_cifar10, write_imagenet_folders, write_word_tokenizer

NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


# ---------------------------------------------------------------- model-level reference tests

def _cfg(**prompt):
    from dodo.models.prompt.config import PromptConfig, PromptModelConfig
    from dodo.models.clip.config import ClipConfig

    clip = ClipConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                      text_hidden=32, text_layers=2, text_heads=2, max_text_len=32, projection_dim=16)
    return PromptModelConfig(clip=clip, prompt=PromptConfig(**prompt))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dodo.data.tokenizer import load_tokenizer

    return load_tokenizer(str(write_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")))


def _model(tokenizer, **prompt):
    from dodo.models.prompt.model import PromptCLIP

    torch.manual_seed(0)
    return PromptCLIP(_cfg(**prompt), tokenizer, NAMES).eval()


def _clip_text(model, tokenizer, texts):
    """CLIP's own text features (get_text_features on the collator's ids), unit norm."""
    from dodo.data.collate import CaptionCollator

    ids, mask = CaptionCollator(tokenizer, 32).token_ids(texts)
    out = model.clip.get_text_features(input_ids=ids, attention_mask=mask)
    return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)


def _replace_embeddings(model, ids, mask, replacement):
    """CLIP's forward on ``ids`` with the token embedding's output at mask==True replaced by
    ``replacement`` (a hook on the frozen embedding; ids there are placeholders)."""
    emb = model.clip.text_model.embeddings.token_embedding

    def hook(_m, _inp, out):
        out = out.clone()
        out[mask] = replacement.to(out.dtype)
        return out
    handle = emb.register_forward_hook(hook)
    try:
        out = model.clip.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    return F.normalize(out if torch.is_tensor(out) else out.pooler_output, dim=-1)


@torch.no_grad()
@pytest.mark.parametrize("csc", [False, True])
def test_coop_with_photo_context_equals_clip_handcrafted_prompt(tokenizer, csc) -> None:
    model = _model(tokenizer, ctx_init="a photo of a", csc=csc)
    assert model.ctx.shape == ((4, 4, 32) if csc else (4, 32))  # M = the phrase's 4 tokens
    ours = model.encode_text(NAMES)
    ref = _clip_text(model, tokenizer, [f"a photo of a {n}." for n in NAMES])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # Another context gives other features (the test can fail).
    model.ctx.add_(0.5 * torch.randn_like(model.ctx))
    assert (model.encode_text(NAMES) - ref).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_positions_against_hand_built_embeddings(tokenizer, position) -> None:
    model = _model(tokenizer, n_ctx=4, class_token_position=position, csc=True)
    ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]
    for c, name in enumerate(NAMES):
        ctx = model.ctx[c]  # (4, D)
        name_ids, dot = ids(name), ids(".")
        ph = ids("a")  # placeholder id for the context slots (replaced by the hook)
        if position == "end":
            seq, slots = ph * 4 + name_ids, list(range(4))
        elif position == "front":
            seq, slots = name_ids + ph * 4, list(range(len(name_ids), len(name_ids) + 4))
        else:
            seq, slots = ph * 2 + name_ids + ph * 2, [0, 1, 2 + len(name_ids), 3 + len(name_ids)]
        seq = torch.tensor([seq + dot + [tokenizer.eos_token_id]])
        mask = torch.zeros_like(seq, dtype=torch.bool)
        mask[0, slots] = True
        ref = _replace_embeddings(model, seq, mask, ctx)
        ours = model.encode_text([name])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["concat", "add"])
def test_structured_prompt_logits_against_hand_built(tokenizer, mode) -> None:
    kw = dict(method="structured", n_general=2, n_domain=2, n_instance=4 if mode == "add" else 3,
              instance_heads=2, instance_mode=mode)
    model = _model(tokenizer, **kw)
    images = torch.randn(2, 3, 32, 32)
    names = model.name_ids(NAMES)
    ours = model.logits(images, names, list(range(4)))  # (B, C)

    # Hand-built: vision tower -> patch tokens -> attention by hand -> prompts -> CLIP's forward.
    vm = model.clip.vision_model
    h = vm(pixel_values=images).last_hidden_state
    img = F.normalize(model.clip.visual_projection(vm.post_layernorm(h[:, 0])), dim=-1)
    patches = vm.post_layernorm(h[:, 1:])  # (B, N, d_v)
    attn = model.instance_attn
    d_v, heads = patches.shape[-1], attn.num_heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = (model.queries @ wq.T + bq).view(-1, heads, d_v // heads).transpose(0, 1)  # (H, i, dh)
    k = (patches @ wk.T + bk).view(2, -1, heads, d_v // heads).transpose(1, 2)  # (B, H, N, dh)
    v = (patches @ wv.T + bv).view(2, -1, heads, d_v // heads).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d_v // heads), -1)  # (B, H, i, N)
    o = (w @ v).transpose(1, 2).reshape(2, -1, d_v) @ attn.out_proj.weight.T + attn.out_proj.bias
    inst = model.instance_out(o)  # (B, i, D)
    scale = model.clip.logit_scale.exp()
    ph = tokenizer("a", add_special_tokens=False)["input_ids"]
    dot = tokenizer(".", add_special_tokens=False)["input_ids"]
    for b in range(2):
        for c, name in enumerate(NAMES):
            gd = torch.cat([model.general, model.domain[c]])
            ctx = torch.cat([gd, inst[b]]) if mode == "concat" else gd + inst[b]
            seq = torch.tensor([ph * len(ctx) + names[c] + dot + [tokenizer.eos_token_id]])
            mask = torch.zeros_like(seq, dtype=torch.bool)
            mask[0, :len(ctx)] = True
            txt = _replace_embeddings(model, seq, mask, ctx)
            torch.testing.assert_close(ours[b, c], scale[0] * (img[b] @ txt[0]), rtol=1e-5, atol=1e-5)
    # The instance prompt matters: without it (zero attention output map) the logits change.
    model.instance_out.weight.zero_()
    assert (model.logits(images, names, list(range(4))) - ours).abs().max() > 1e-4


def test_only_prompts_train_and_clip_stays_frozen(tokenizer) -> None:
    model = _model(tokenizer, method="structured", n_instance=3)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(not n.startswith("clip.") for n in trainable)
    assert {"general", "domain", "queries"} <= set(trainable)
    before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert model.domain.grad is not None and model.domain.grad.abs().sum() > 0
    assert all(torch.equal(before[n], p) for n, p in model.clip.named_parameters())


# ---------------------------------------------------------------- few-shot draw

def test_few_shot_draw_is_fixed_by_seed_and_per_class() -> None:
    from dodo.data.fewshot import few_shot_indices
    from dodo.models.prompt.config import base_split

    labels = np.repeat(np.arange(5), 20)  # 5 classes x 20 images, one sample each
    ids = np.arange(100)
    a = few_shot_indices(labels, ids, 4, seed=1, classes=range(5))
    assert len(a) == 20 and np.array_equal(np.bincount(labels[a]), [4] * 5)
    assert np.array_equal(a, few_shot_indices(labels, ids, 4, seed=1, classes=range(5)))
    assert not np.array_equal(a, few_shot_indices(labels, ids, 4, seed=2, classes=range(5)))
    # a class's shots do not depend on which other classes are drawn
    b = few_shot_indices(labels, ids, 4, seed=1, classes=[2])
    assert np.array_equal(b, a[labels[a] == 2])
    # several captions per image: one sample per image is drawn
    caps = np.repeat(ids, 3)
    c = few_shot_indices(np.repeat(labels, 3), caps, 4, seed=1, classes=range(5))
    assert len(set(caps[c])) == 20
    with pytest.raises(ValueError, match="class 3 has 20 images, fewer than 21"):
        few_shot_indices(labels, ids, 21, seed=1, classes=[3])
    assert base_split(5, []) == ([0, 1, 2], [3, 4]) and base_split(4, [1, 3]) == ([1, 3], [0, 2])
    assert base_split(4, [], base_to_new=False) == ([0, 1, 2, 3], [])


# ---------------------------------------------------------------- jobs: refusals and tiny runs

@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt")
    out = {"tokenizer": write_word_tokenizer(root / "tokenizer" / "tokenizer.json")}
    tree, mapping = write_imagenet_folders(root / "src" / "imagenet", 10, 16, size=32)
    out["imagenet_train"] = make_cache(tree, "folder", root / "imagenet_train", classnames=str(mapping),
                                       dataset="imagenet1k", split="train")
    vtree, _ = write_imagenet_folders(root / "src" / "imagenet", 10, 6, size=32, split="val")
    out["imagenet_val"] = make_cache(vtree, "folder", root / "imagenet_val", classnames=str(mapping),
                                     dataset="imagenet1k", split="val")
    cifar = write_cifar10(root / "src", per_batch=20, test=40)
    out["cifar10_train"] = make_cache(cifar, "cifar", root / "cifar10_train", split="train")
    out["cifar10_test"] = make_cache(cifar, "cifar", root / "cifar10_test", split="test")
    # an image-only cache without labels (a folder of loose images)
    loose = root / "src" / "loose"
    loose.mkdir(parents=True)
    from data_helpers import image_bytes
    rows = []
    for i in range(8):
        (loose / f"img{i}.jpg").write_bytes(image_bytes(i, 32))
        rows.append(f"img{i}.jpg,a photo of a dog on the beach")
    (loose / "captions.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    out["unlabelled"] = make_cache(loose / "captions.csv", "folder", root / "unlabelled", images=str(loose))
    # labelled by index only (img2dataset .cls): classes named "0", "1", "2"
    from data_helpers import write_img2dataset
    out["index_labels"] = make_cache(write_img2dataset(root / "src" / "i2d", 12, labels=True), "webdataset",
                                     root / "index_labels")
    return out


def _data(c: dict[str, Path], train: str = "imagenet_train", test: str = "imagenet_val") -> list[str]:
    return [f"data.train_cache={c[train]}", f"data.eval_cache={c[test]}", f"model.tokenizer={c['tokenizer']}"]


def _refused(workdir: Path, *args: str) -> str:
    proc = dodo("submit", *args, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dodo: error:"), proc.stderr
    assert not (workdir / "runs").exists()
    return lines[0]


def test_refusals_at_submit(workdir: Path, caches) -> None:
    # the submit check's torch-free label counts equal the data layer's
    from dodo.data.fewshot import class_counts
    from dodo.models.prompt.config import _manifest, label_counts
    for name in ("imagenet_train", "cifar10_train", "index_labels"):
        assert label_counts(str(caches[name]), _manifest(str(caches[name]))) == class_counts(caches[name]).tolist()
    assert class_counts(caches["imagenet_train"]).tolist() == [16] * 10
    line = _refused(workdir, "jobs/prompt_coop.yaml", *_data(caches), "model.prompt.shots=20")
    assert "model.prompt.shots" in line and "class 0 ('tench')" in line and "only 16 images" in line, line
    line = _refused(workdir, "jobs/prompt_coop.yaml", *_data(caches), f"data.train_cache={caches['unlabelled']}")
    assert "no labels" in line, line
    line = _refused(workdir, "jobs/prompt_coop.yaml", *_data(caches), f"data.train_cache={caches['index_labels']}",
                    "model.prompt.shots=2")
    assert "model.prompt.classnames" in line and "only by index" in line, line
    line = _refused(workdir, "jobs/prompt_structured.yaml", *_data(caches), "model.prompt.shots=1",
                    "train.micro_batch=4")
    assert "train.micro_batch" in line, line
    line = _refused(workdir, "jobs/prompt_coop.yaml", *_data(caches), "data.eval_cache=")
    assert "data.eval_cache" in line, line


def test_real_size_jobs_dry_run(workdir: Path) -> None:
    for job in ("jobs/prompt_coop_vitb16.yaml", "jobs/prompt_structured_vitb16.yaml"):
        proc = dodo("submit", job, "--dry-run", cwd=workdir)
        assert "family: prompt" in proc.stdout and "shots: 16" in proc.stdout, proc.stdout[-2000:]
        assert not (workdir / "runs").exists()


def _run(workdir: Path, job: str, name: str, *overrides: str) -> dict:
    dodo("submit", job, f"name={name}", *overrides, cwd=workdir, timeout=600)
    (run,) = run_dirs(workdir / "runs", name)
    return json.loads((run / "summary.json").read_text()), metrics(run)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tiny_coop_job_improves_base_accuracy(workdir: Path, caches) -> None:
    # The zero-shot suite through the task's hooks: each "{}"-filled text is a class name inside
    # the learned prompt (docs/methods.md).
    (workdir / "names_only.txt").write_text("{}\n")
    suite = (f"eval.suites=[{{kind: zeroshot, datasets: [{{name: inet, cache: '{caches['imagenet_val']}', "
             f"templates: '{workdir / 'names_only.txt'}'}}]}}]")
    summary, rows = _run(workdir, "jobs/prompt_coop.yaml", "coop_t", *_data(caches), suite)
    flat = json.dumps(summary)
    evals = [r for r in rows if "eval.prompt.imagenet1k.base_top1" in r]
    assert len(evals) >= 2, rows
    first, last = evals[0]["eval.prompt.imagenet1k.base_top1"], evals[-1]["eval.prompt.imagenet1k.base_top1"]
    assert last > first, (first, last)
    for key in ("eval.prompt.imagenet1k.new_top1", "eval.prompt.imagenet1k.hm",
                "eval.prompt_handcrafted.imagenet1k.base_top1", "eval.zeroshot.inet.top1"):
        assert key in flat, flat[:2000]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_tiny_structured_job_on_cifar_improves(workdir: Path, caches) -> None:
    summary, rows = _run(workdir, "jobs/prompt_structured.yaml", "struct_t",
                         *_data(caches, "cifar10_train", "cifar10_test"))
    evals = [r for r in rows if "eval.prompt.cifar10.base_top1" in r]
    assert len(evals) >= 2, rows
    assert evals[-1]["eval.prompt.cifar10.base_top1"] > evals[0]["eval.prompt.cifar10.base_top1"], evals
