"""The synthetic shapes dataset, the word-level tokenizer asset and the caption collator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from dodo.data.collate import CaptionCollator
from dodo.data.synthetic import (COLOURS, POSITIONS, SHAPES, SIZES, Sample, SyntheticShapes,
                                 all_captions, attribute_words, caption_attributes)
from dodo.data.tokenizer import (BUILTIN_SYNTHETIC, EOS_TOKEN, IMAGE_TOKEN, asset_path,
                                 load_tokenizer, main)

N = 500  # enough samples to see every attribute value (180 combinations)


@pytest.fixture(scope="module")
def train() -> list[Sample]:
    ds = SyntheticShapes("train", N, image_size=32, seed=1234)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUILTIN_SYNTHETIC)


def _shape_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of the shape. Every colour has a channel >= 200, background <= ~45."""
    return image.max(axis=-1) > 100


def _as_list(batch: list[Sample]) -> list[Sample]:
    return batch  # module level, so it pickles for any worker start method


# --- dataset -------------------------------------------------------------------------------

def test_sample_is_a_pure_function_of_seed_split_index(train: list[Sample]) -> None:
    again = SyntheticShapes("train", N, image_size=32, seed=1234)  # a fresh construction
    for i in (0, 1, 17, N - 1):
        a, b = train[i], again[i]
        assert np.array_equal(a.image, b.image)
        assert (a.caption, a.key, a.attrs) == (b.caption, b.key, b.attrs)
    assert np.array_equal(again[-1].image, train[N - 1].image)
    with pytest.raises(IndexError):
        again[N]


def test_splits_and_seeds_give_different_streams(train: list[Sample]) -> None:
    evals = SyntheticShapes("eval", N, seed=1234)
    other_seed = SyntheticShapes("train", N, seed=1235)
    for other in (evals, other_seed):
        same = sum(np.array_equal(train[i].image, other[i].image) for i in range(50))
        assert same == 0
    assert train[123].key == "train-000123" and evals[5].key == "eval-000005"


def test_dataloader_workers_see_the_same_samples(train: list[Sample]) -> None:
    ds = SyntheticShapes("train", 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=_as_list)
    got = [s for batch in loader for s in batch]
    assert [s.key for s in got] == [s.key for s in train[:8]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(got, train))


def test_image_format(train: list[Sample]) -> None:
    s = train[0]
    assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert SyntheticShapes("eval", 2, image_size=64)[0].image.shape == (64, 64, 3)


def test_caption_grammar_and_attribute_parse(train: list[Sample]) -> None:
    for s in train:
        a = s.attrs
        assert s.caption == f"a {a['size']} {a['colour']} {a['shape']} in the {a['position']}"
        assert caption_attributes(s.caption) == a
    assert caption_attributes("a small red circle in the top left") == {
        "colour": "red", "shape": "circle", "size": "small", "position": "top left"}
    # Free-form model output: what is there is found, what is missing is None.
    assert caption_attributes("Blue triangle, centre.") == {
        "colour": "blue", "shape": "triangle", "size": None, "position": "center"}
    assert caption_attributes("") == dict.fromkeys(("colour", "shape", "size", "position"))


def test_every_attribute_value_appears(train: list[Sample]) -> None:
    words = attribute_words()
    assert words == {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES),
                     "position": tuple(POSITIONS)}
    for name, values in words.items():
        assert {s.attrs[name] for s in train} == set(values), name
    assert len(set(all_captions())) == 6 * 3 * 2 * 5


@pytest.mark.parametrize("colour,channel", [("red", 0), ("green", 1), ("blue", 2)])
def test_shape_colour_is_dominated_by_its_channel(train: list[Sample], colour: str,
                                                  channel: int) -> None:
    chosen = [s for s in train if s.attrs["colour"] == colour]
    assert chosen
    for s in chosen:
        mean = s.image[_shape_pixels(s.image)].astype(float).mean(axis=0)  # (3,)
        assert mean.argmax() == channel and mean[channel] > 1.5 * np.delete(mean, channel).max()


def test_size_and_position_are_unambiguous(train: list[Sample]) -> None:
    for shape in SHAPES:
        areas = {z: [_shape_pixels(s.image).sum() for s in train
                     if s.attrs["shape"] == shape and s.attrs["size"] == z] for z in SIZES}
        assert min(areas["large"]) > 2 * max(areas["small"]), shape
    for s in train:
        ys, xs = np.nonzero(_shape_pixels(s.image))
        cx, cy = xs.mean(), ys.mean()  # centroid in pixels; the image centre is 16
        if s.attrs["position"] == "center":
            assert abs(cx - 16) < 3 and abs(cy - 16) < 4, s.key  # a triangle's centroid sits low
        else:
            vertical, horizontal = s.attrs["position"].split()
            assert (cy < 16) == (vertical == "top") and (cx < 16) == (horizontal == "left"), s.key


# --- tokenizer ----------------------------------------------------------------------------

def test_tokenizer_round_trips_every_caption(tokenizer) -> None:
    for caption in all_captions():
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == caption


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id != tokenizer.unk_token_id
    assert tokenizer(f"{IMAGE_TOKEN} a RED square")["input_ids"] == \
        [image_id] + tokenizer("a red square")["input_ids"]
    assert tokenizer("a red fish")["input_ids"][-1] == tokenizer.unk_token_id
    assert len(tokenizer) == 22  # 3 specials + 19 caption words; nothing was added on load


def test_asset_equals_rebuild(tmp_path: Path) -> None:
    out = tmp_path / "tok.json"
    assert main(["--rebuild", "--out", str(out)]) == 0
    rebuilt, committed = json.loads(out.read_text()), json.loads(asset_path().read_text())
    assert rebuilt["model"]["vocab"] == committed["model"]["vocab"]
    assert rebuilt == committed  # normaliser, pre-tokenizer and added tokens as well
    vocab = rebuilt["model"]["vocab"]
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])][3:]
    assert words == sorted(words)  # deterministic order: specials, then sorted words


def test_load_tokenizer_from_local_paths(tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path / "dir")
    from_dir = load_tokenizer(str(tmp_path / "dir"))
    assert from_dir("a small red circle")["input_ids"] == tokenizer("a small red circle")["input_ids"]
    # A bare tokenizer.json with no EOS and no <|image|>: both are added, pad = eos.
    bare = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "bare.json"))
    loaded = load_tokenizer(str(tmp_path / "bare.json"))
    assert loaded.eos_token == EOS_TOKEN and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 3 and len(loaded) == 4


def test_load_tokenizer_missing_path_names_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="set model.tokenizer to a local tokenizer") as e:
        load_tokenizer(str(missing))
    assert str(missing) in str(e.value) and BUILTIN_SYNTHETIC in str(e.value)


# --- collator -----------------------------------------------------------------------------

def test_collator_shapes_padding_and_eos(train: list[Sample], tokenizer) -> None:
    collate = CaptionCollator(tokenizer, max_tokens=16)
    samples = train[:4]
    samples[1] = Sample(samples[1].image, "a red circle", "short")  # force padding
    batch = collate(samples)
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1.0 and batch["images"].max() <= 1.0
    expected = (torch.from_numpy(samples[0].image).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(batch["images"][0], expected)

    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (4, 9)
    eos = tokenizer.eos_token_id
    for b, s in enumerate(samples):
        n = len(s.caption.split()) + 1  # caption words + one EOS
        assert mask[b].tolist() == [1] * n + [0] * (9 - n)
        assert ids[b, n - 1] == eos and (ids[b, n:] == tokenizer.pad_token_id).all()
        assert tokenizer.decode(ids[b, :n], skip_special_tokens=True) == s.caption
    assert batch["captions"] == [s.caption for s in samples]
    assert batch["keys"] == ["train-000000", "short", "train-000002", "train-000003"]


def test_collator_truncates_including_eos(train: list[Sample], tokenizer) -> None:
    batch = CaptionCollator(tokenizer, max_tokens=4)(train[:3])
    assert batch["input_ids"].shape == (3, 4) and batch["attention_mask"].all()
    assert (batch["input_ids"][:, -1] == tokenizer.eos_token_id).all()
    first = tokenizer(train[0].caption)["input_ids"][:3]
    assert batch["input_ids"][0, :3].tolist() == first
    with pytest.raises(ValueError, match="max_tokens"):
        CaptionCollator(tokenizer, max_tokens=0)


def test_collator_custom_normalisation(train: list[Sample], tokenizer) -> None:
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)  # CLIP's statistics
    images = CaptionCollator(tokenizer, 16, mean, std)(train[:2])["images"]
    raw = torch.from_numpy(np.stack([s.image for s in train[:2]])).permute(0, 3, 1, 2) / 255
    restored = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(restored, raw, atol=1e-6)
