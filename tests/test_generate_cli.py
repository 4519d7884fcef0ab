"""`dodo generate RUN --image PATH [--prompt TEXT] ...` on a real tiny MAGMA run (one rank, a few
steps on the Karpathy-COCO cache with the local word tokenizer), JPEGs written by PIL: the
command's text equals the library path run by hand (image resized as the cache was, the
interleaved prompt embedded by MagmaModel.embed_image / embed_tokens, greedy / beam / sampling
with the KV cache); the flags' order is the prompt's order; bad input is one line, exit 2.
Also the model-level agreement the command relies on: an (image, text) prompt embedded piece
by piece equals MagmaModel.embed, for MAGMA's projection and for LiMBeR's linear maps."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import dodo, run_dirs
from test_real_magma_e2e import real_magma


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A natural-ish photo stand-in, not square (so the resize mode matters), saved by PIL."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(128, 50, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, real_data) -> dict[str, Path]:
    """A MAGMA run trained 3 steps on one rank; JPEGs; a copy of the run without checkpoints."""
    root = tmp_path_factory.mktemp("gen")
    repo = Path(__file__).resolve().parents[1]
    (root / "jobs").symlink_to(repo / "jobs")
    (root / "configs").symlink_to(repo / "configs")
    dodo("submit", "jobs/demo.yaml", *real_magma(real_data), "model.lm.n_positions=80",  # room for 2 images + text
         "cluster.tasks_per_node=1", "train.steps=3",
         "train.eval_every=1000", "train.caption_samples=2", cwd=root, timeout=600)
    (run,) = run_dirs(root / "runs", "demo")
    empty = root / "empty_run"
    shutil.copytree(run, empty)
    shutil.rmtree(empty / "checkpoints")
    (empty / "checkpoints").mkdir()
    return {"root": root, "run": run, "empty": empty, "a": _jpeg(root / "a.jpg", 1), "b": _jpeg(root / "b.jpg", 2)}


def _by_hand(run: Path, parts: list, **decoding) -> str:
    """The library path the command must equal: the model rebuilt, images resized center-crop
    (the cache's mode) to data.image_size, normalised as the collator does, then decode."""
    from dodo.data.ingest.images import resize
    from dodo.eval.generate import Decoding, decode, embed_interleaved
    from dodo.generate_run import load_model, open_run

    r, cfg, ckpt = open_run(str(run))
    model, tok = load_model(r, cfg, ckpt, "cpu")
    prompt = []
    for p in parts:
        if isinstance(p, Path):
            im = resize(Image.open(io.BytesIO(p.read_bytes())).convert("RGB"), cfg.data.image_size, "center-crop")
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0
            prompt.append((x - 0.5) / 0.5)
        else:
            prompt.append(p)
    with torch.no_grad():
        emb, ids = embed_interleaved(model, prompt, tok, return_ids=True)
        (out,) = decode(model, emb, Decoding(**{"max_tokens": cfg.data.max_caption_tokens, **decoding}), ids)
    return tok.decode(out, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_generate_captions_and_interleaved_prompts(trained) -> None:
    run, a, b, cwd = trained["run"], trained["a"], trained["b"], trained["root"]
    out = dodo("generate", str(run), "--image", str(a), cwd=cwd).stdout.strip()
    assert out == _by_hand(run, [a])
    few = ["--image", str(a), "--prompt", "a photo of a dog", "--image", str(b), "--prompt", "a photo of"]
    out = dodo("generate", str(run), *few, "--max-new-tokens", "5", cwd=cwd).stdout.strip()
    assert out == _by_hand(run, [a, "a photo of a dog", b, "a photo of"], max_tokens=5)
    assert len(out.split()) <= 5
    beam = dodo("generate", str(run), "--image", str(b), "--beam", "3", cwd=cwd).stdout.strip()
    assert beam == _by_hand(run, [b], method="beam", beams=3)
    sample = ["--image", str(a), "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--seed", "4"]
    s1 = dodo("generate", str(run), *sample, cwd=cwd).stdout.strip()
    assert s1 == _by_hand(run, [a], method="sample", temperature=1.5, top_k=20, top_p=0.9, seed=4)


@pytest.mark.slow
def test_generate_bad_input_is_one_line(trained, tmp_path: Path) -> None:
    from dodo.config.loader import dump_config, load_job
    from dodo.rundir import RunDir

    run, a, cwd = trained["run"], trained["a"], trained["root"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(a.read_bytes()[:40])
    clip = RunDir.create(tmp_path / "runs", "clip", dump_config(load_job(Path(cwd) / "jobs" / "clip_lora.yaml")))
    cases = [((str(trained["empty"]), "--image", str(a)), "no published checkpoint"),
             ((str(clip.path), "--image", str(a)), "model.family=clip"),
             ((str(run), "--image", str(broken)), "broken.jpg: PIL cannot read it"),
             ((str(run), "--image", str(tmp_path / "nope.jpg")), "nope.jpg: no such file"),
             ((str(run), "--prompt", "a dog"), "at least one --image"),
             ((str(run), "--image", str(a), "--beam", "2", "--top-k", "5"), "exclude each other"),
             ((str(run), *["--image", str(a)] * 5), "more than the LM's context of 80"),
             ((str(tmp_path),  "--image", str(a)), "not a dodo run directory")]
    for args, message in cases:
        proc = dodo("generate", *args, cwd=cwd, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("dodo: error:"), (args, proc.stderr)
        assert message in lines[0], (message, lines[0])


@pytest.mark.parametrize("prefix", [{}, {"kind": "linear"}, {"kind": "linear", "tokens": 3}])
def test_piecewise_embedding_equals_embed(prefix) -> None:
    from dodo.eval.generate import embed_interleaved
    from dodo.models.magma.config import ImageEncoderConfig, ImagePrefixConfig, LMConfig, MagmaModelConfig
    from dodo.models.magma.model import MagmaModel

    torch.manual_seed(0)
    cfg = MagmaModelConfig(lm=LMConfig(d_model=32, n_head=2, n_layer=2, init_std=0.3),
                           image_encoder=ImageEncoderConfig(hidden=16, n_layer=1, n_head=2, image_size=16),
                           image_prefix=ImagePrefixConfig(**prefix))
    model = MagmaModel(cfg, vocab_size=40, eos_token_id=0).eval()

    class Tok:  # word i -> id i
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [int(w) for w in text.split()]}

    image = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 7, 9]])
    with torch.no_grad():
        want = model.embed(image[None], ids)
        got = embed_interleaved(model, [image, "5 7 9"], Tok())
        assert model.embed_image(image[None]).shape[1] == (prefix.get("tokens") or 4)  # 2 x 2 patches of 8 px, or k
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(model.embed_tokens(ids), model.lm.get_input_embeddings()(ids))


def test_flags_keep_their_order_and_pick_the_decoder() -> None:
    from dodo.cli import parse_args
    from dodo.config.errors import ConfigError
    from dodo.generate_run import decoding_options

    args = parse_args(["generate", "r", "--image", "a.jpg", "--prompt", "a dog .", "--image", "b.jpg",
                       "--prompt", "a", "--image", "c.jpg"])
    assert args.parts == [("image", "a.jpg"), ("prompt", "a dog ."), ("image", "b.jpg"), ("prompt", "a"),
                          ("image", "c.jpg")]
    assert decoding_options(args) == {"method": "greedy", "beams": 1, "seed": 0}
    beam = parse_args(["generate", "r", "--image", "a.jpg", "--beam", "4", "--max-new-tokens", "7"])
    assert decoding_options(beam) == {"method": "beam", "beams": 4, "seed": 0, "max_tokens": 7}
    sample = parse_args(["generate", "r", "--image", "a.jpg", "--top-p", "0.9", "--seed", "3"])
    assert decoding_options(sample) == {"method": "sample", "beams": 1, "seed": 3, "top_p": 0.9}
    for bad, message in ((["--temperature", "0"], "must be > 0"), (["--top-p", "1.5"], "in \\(0, 1\\]"),
                         (["--beam", "0"], ">= 1")):
        with pytest.raises(ConfigError, match=message):
            decoding_options(parse_args(["generate", "r", "--image", "a.jpg", *bad]))
