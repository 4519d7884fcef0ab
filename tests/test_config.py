"""The config loader: composition, overrides, dumping and every error a person can hit.

Each test writes its own small configs/ tree and job files under tmp_path, so it does not depend
on what the repository ships; the last tests load the shipped jobs and fragments.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Literal, Optional

import pytest

from dodo.config.errors import ConfigError
from dodo.config.loader import build_config, config_to_dict, dump_config, load_job, parse_override
from dodo.config.schema import JobConfig

REPO = Path(__file__).resolve().parents[1]

FRAGMENTS = {
    "model/tiny.yaml": """
        model:
          lm: {d_model: 64, n_layer: 1, n_head: 2, path: /weights/lm}
          image_encoder: {hidden: 32}
    """,
    "model/wide.yaml": "model: {lm: {d_model: 256}}\n",
    "adapter/bottleneck.yaml": """
        model:
          adapter: {kind: bottleneck, downsample: 8, locations: [mlp, attention]}
    """,
    "adapter/attn_only.yaml": "model: {adapter: {locations: [attention]}}\n",
    "train/demo.yaml": "train: {steps: 50, lr: 1e-3, betas: [0.8, 0.9]}\n",
    "train/short.yaml": "defaults: [train/demo]\ntrain: {steps: 10}\n",
    "train/negative.yaml": "train: {steps: -3}\n",
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture(autouse=True)
def no_configs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DODO_CONFIGS", raising=False)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """tmp_path with configs/ (the fragments above) and an empty jobs/ beside it."""
    for name, text in FRAGMENTS.items():
        write(tmp_path / "configs" / name, text)
    (tmp_path / "jobs").mkdir()
    return tmp_path


def job(root: Path, text: str, name: str = "x.yaml") -> Path:
    return write(root / "jobs" / name, text)


def error_of(path: Path | str, overrides: tuple[str, ...] = (), **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path, overrides, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- composition and overrides


def test_empty_job_is_an_error_naming_the_fix(root: Path) -> None:
    assert "is empty; a job names at least its fragments" in error_of(job(root, ""), ())
    assert "is empty" in error_of(job(root, "# only a comment\n"), ())


def test_job_of_one_key_is_all_defaults(root: Path) -> None:
    assert load_job(job(root, "name: run\n")) == JobConfig()


def test_fragments_then_job_keys_deep_merged(root: Path) -> None:
    cfg = load_job(job(root, """
        defaults: [model/tiny, adapter/bottleneck, train/demo]
        model: {lm: {n_layer: 3}}
        train: {steps: 7}
    """))
    assert (cfg.model.lm.d_model, cfg.model.lm.n_layer, cfg.model.lm.n_head) == (64, 3, 2)
    assert cfg.model.image_encoder.hidden == 32
    assert cfg.model.image_encoder.n_layer == JobConfig().model.image_encoder.n_layer  # default kept
    assert cfg.model.adapter.downsample == 8 and cfg.model.adapter.placement == "sequential"
    assert cfg.train.steps == 7  # the job file beats its fragment
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML 1.1 read '1e-3' as a string
    assert cfg.train.betas == [0.8, 0.9]


def test_later_fragment_wins_and_lists_replace(root: Path) -> None:
    cfg = load_job(job(root, "defaults: [model/tiny, model/wide, adapter/bottleneck, adapter/attn_only]\n"))
    assert cfg.model.lm.d_model == 256 and cfg.model.lm.n_head == 2
    assert cfg.model.adapter.locations == ["attention"]  # replaced, not appended
    assert cfg.model.adapter.downsample == 8


def test_fragment_defaults_resolve_recursively(root: Path) -> None:
    cfg = load_job(job(root, "defaults: [train/short]\n"))
    assert cfg.train.steps == 10 and cfg.train.lr == 1e-3


def test_overrides_beat_everything(root: Path) -> None:
    cfg = load_job(job(root, "defaults: [model/tiny]\nname: from_file\ntrain: {lr: 0.5}\n"), [
        "train.lr=1e-4", "model.adapter.locations=[mlp,attention]", "model.lm.path=null",
        "name=from_cli", "train.betas=[0.5, 0.6]", "model.image_encoder.trainable=true",
        "model.adapter={kind: none}",
    ])
    assert cfg.train.lr == 1e-4
    assert cfg.model.adapter.locations == ["mlp", "attention"]
    assert cfg.model.lm.path is None and cfg.model.lm.d_model == 64
    assert cfg.name == "from_cli"
    assert cfg.train.betas == [0.5, 0.6]
    assert cfg.model.image_encoder.trainable is True
    assert cfg.model.adapter.kind == "none" and cfg.model.adapter.locations == ["mlp", "attention"]


def test_parse_override() -> None:
    assert parse_override("train.steps=5") == ("train.steps", 5)
    assert parse_override("train.lr=1e-4") == ("train.lr", "1e-4")  # a string; build_config reads it
    assert parse_override("model.lm.path=null") == ("model.lm.path", None)
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("name=a=b") == ("name", "a=b")


def test_configs_dir_from_env_and_argument(root: Path, tmp_path_factory, monkeypatch) -> None:
    other = tmp_path_factory.mktemp("other")
    write(other / "model" / "tiny.yaml", "model: {lm: {n_layer: 9}}\n")
    path = job(root, "defaults: [model/tiny]\n")
    assert load_job(path).model.lm.n_layer == 1  # <job dir>/../configs
    assert load_job(path, configs_dir=other).model.lm.n_layer == 9
    monkeypatch.setenv("DODO_CONFIGS", str(other))
    assert load_job(path).model.lm.n_layer == 9


def test_float_fields_accept_ints_and_int_fields_reject_floats(root: Path) -> None:
    assert load_job(job(root, "train: {lr: 1}\n")).train.lr == 1.0
    message = error_of(job(root, "train: {steps: 10.0}\n"))
    assert "train.steps must be an integer, got 10.0 (float); write 10" in message


# At module level: get_type_hints cannot resolve string annotations that name local classes.
@dataclasses.dataclass
class Inner:
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    size: Optional[int] = None
    ratios: list[float] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_build_config_generic() -> None:
    assert build_config(Outer, {"ratios": [1, "2e-3"], "inner": {"mode": "b"}}) == Outer(None, [1.0, 2e-3], Inner("b"))
    with pytest.raises(ConfigError, match=r"^file\.yaml: ratios\[1\] must be a number, got 'x' \(str\)$"):
        build_config(Outer, {"ratios": [1, "x"]}, {"ratios": "file.yaml"})
    with pytest.raises(ConfigError, match=r"^default: cfg\.size must be an integer, got True \(bool\)$"):
        build_config(Outer, {"size": True}, prefix="cfg")


# ---------------------------------------------------------------- dumping


def test_dump_round_trip(root: Path) -> None:
    cfg = load_job(job(root, "defaults: [model/tiny, adapter/bottleneck, train/short]\nname: rt\n"),
                   ["train.lr=2.5e-7", "model.lm.path=null", "model.image_encoder.path='yes'"])
    text = dump_config(cfg)
    assert "defaults" not in text
    again = load_job(write(root / "resolved.yaml", text))  # no configs/ needed: nothing to compose
    assert again == cfg
    assert again.model.image_encoder.path == "yes"  # dumped quoted, so not read back as a bool
    assert config_to_dict(cfg)["model"]["adapter"]["locations"] == ["mlp", "attention"]


def test_dump_round_trip_of_defaults(tmp_path: Path) -> None:
    assert load_job(write(tmp_path / "d.yaml", dump_config(JobConfig()))) == JobConfig()


# ---------------------------------------------------------------- errors: files


def test_missing_job_file_lists_jobs_and_suggests(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job(root, "", "demo.yaml")
    job(root, "", "tiny.yaml")
    monkeypatch.chdir(root)
    message = error_of("jobs/deom.yaml")
    assert message == ("job file 'jobs/deom.yaml' not found; available in jobs/: demo.yaml, tiny.yaml; "
                       "did you mean 'jobs/demo.yaml'?")
    assert "the folder nowhere/ does not exist" in error_of("nowhere/x.yaml")


def test_yaml_syntax_error_names_line_and_column(root: Path) -> None:
    path = job(root, "train:\n  steps: 5\n bad: 1\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:2: invalid YAML: expected <block end>")
    assert "fix the file" in message


def test_yaml_unclosed_bracket_says_where_it_opened(root: Path) -> None:
    message = error_of(job(root, "model:\n  adapter:\n    locations: [mlp, attention\n"))
    assert "x.yaml:4:1: invalid YAML: expected ',' or ']'" in message
    assert "started at line 3, column 16" in message


def test_yaml_error_in_fragment_names_the_fragment(root: Path) -> None:
    write(root / "configs" / "train" / "broken.yaml", "train: {steps: 5\n")
    message = error_of(job(root, "defaults: [train/broken]\n"))
    assert "train/broken.yaml:2:1: invalid YAML" in message


def test_duplicate_key_is_an_error(root: Path) -> None:
    path = job(root, "train:\n  steps: 5\n  steps: 6\n")
    assert error_of(path).startswith(f"{path}:3:3: invalid YAML: duplicate key 'steps' (first set on line 2)")


def test_top_level_must_be_a_mapping(root: Path) -> None:
    path = job(root, "- a\n- b\n")
    assert error_of(path) == (f"{path}: the top level must be a mapping of keys such as "
                              f"'train: {{steps: 100}}', got ['a', 'b'] (list)")


# ---------------------------------------------------------------- errors: keys and types


@pytest.mark.parametrize("text, key, fix", [
    ("train: {stpes: 5}\n", "train.stpes", "did you mean 'train.steps'?"),
    ("model: {lm: {d_modle: 8}}\n", "model.lm.d_modle", "did you mean 'model.lm.d_model'?"),
    ("trian: {steps: 5}\n", "trian", "did you mean 'train'?"),
    ("train: {zzz: 1}\n", "train.zzz", "valid keys in train: steps, micro_batch,"),
])
def test_unknown_key(root: Path, text: str, key: str, fix: str) -> None:
    path = job(root, text)
    assert error_of(path).startswith(f"{path}: unknown key '{key}'; {fix}")


def test_unknown_key_in_fragment_names_the_fragment(root: Path) -> None:
    write(root / "configs" / "train" / "typo.yaml", "train: {lr_warmup: 5}\n")
    message = error_of(job(root, "defaults: [train/typo]\n"))
    assert "train/typo.yaml: unknown key 'train.lr_warmup'" in message


@pytest.mark.parametrize("text, expected", [
    ("train: {steps: abc}\n", "train.steps must be an integer, got 'abc' (str)"),
    ("train: {steps: true}\n", "train.steps must be an integer, got True (bool)"),
    ("train: {lr: fast}\n", "train.lr must be a number, got 'fast' (str)"),
    ("model: {image_encoder: {trainable: 1}}\n", "model.image_encoder.trainable must be true or false, got 1 (int)"),
    ("name: yes\n", "name must be a string, got True (bool); put it in quotes"),
    ("model: {adapter: {locations: mlp}}\n", "model.adapter.locations must be a list, got 'mlp' (str); write it as [mlp]"),
    ("train: 5\n", "train must be a mapping of settings, got 5 (int)"),
    ("model: {adapter: {kind: bottelneck}}\n",
     "model.adapter.kind must be one of (none, bottleneck, lora, prefix, mam, film, r_adapter), got 'bottelneck' "
     "(str); did you mean 'bottleneck'?"),
    ("model: {adapter: {locations: [mlp, mpl]}}\n",
     "model.adapter.locations[1] must be one of (attention, mlp), got 'mpl' (str)"),
])
def test_wrong_type(root: Path, text: str, expected: str) -> None:
    path = job(root, text)
    assert error_of(path).startswith(f"{path}: {expected}")


# ---------------------------------------------------------------- errors: ranges name their source


def test_range_error_names_the_job_file(root: Path) -> None:
    path = job(root, "defaults: [train/demo]\ntrain: {steps: -5}\n")
    assert error_of(path).startswith(f"{path}: train.steps=-5: must be > 0, got -5; set the number")


def test_range_error_names_the_fragment(root: Path) -> None:
    message = error_of(job(root, "defaults: [train/negative]\n"))
    assert message.endswith("train/negative.yaml: train.steps=-3: must be > 0, got -3; set the number of optimizer steps")


def test_range_error_names_the_override(root: Path) -> None:
    message = error_of(job(root, "model: {adapter: {dropout: 0.1}}\n"), ("model.adapter.dropout=1.5",))
    assert message == "command line override: model.adapter.dropout=1.5: must be in [0, 1), got 1.5"


def test_cross_field_check(root: Path) -> None:
    message = error_of(job(root, "model: {lm: {arch: gptj, rotary_dim: 7}}\n"))
    assert message.endswith("x.yaml: model.lm.rotary_dim=7: must be even and in (0, d_model / n_head = 32], got 7")


def test_range_error_on_unset_key_says_default(root: Path) -> None:
    # d_model (default 128) is checked against n_head, which the file set to 3.
    message = error_of(job(root, "model: {lm: {n_head: 3}}\n"))
    assert message == "default: model.lm.d_model=128: d_model=128 must be divisible by n_head=3"


# ---------------------------------------------------------------- errors: defaults lists


def test_missing_fragment_lists_the_group(root: Path) -> None:
    path = job(root, "defaults: [model/tiyn]\n")
    message = error_of(path)
    assert message.startswith(f"{path}: defaults entry 'model/tiyn': ")
    assert str(Path("configs") / "model" / "tiyn.yaml") in message
    assert "available in" in message and "model/: tiny, wide; did you mean 'model/tiny'?" in message


def test_bad_group(root: Path) -> None:
    message = error_of(job(root, "defaults: [modle/tiny]\n"))
    assert "no group 'modle'" in message
    assert "available groups: adapter, model, train; did you mean 'model'?" in message


def test_missing_fragment_named_by_a_fragment(root: Path) -> None:
    write(root / "configs" / "train" / "chain.yaml", "defaults: [data/nope]\n")
    assert "train/chain.yaml: defaults entry 'data/nope'" in error_of(job(root, "defaults: [train/chain]\n"))


@pytest.mark.parametrize("text, expected", [
    ("defaults: model/tiny\n", "defaults must be a list of fragment names like [model/tiny, train/demo], got 'model/tiny' (str)"),
    ("defaults: [model/tiny, 3]\n", "defaults must be a list of fragment names"),
    ("defaults: [tiny]\n", "defaults entry 'tiny' must be group/name, e.g. model/tiny"),
])
def test_malformed_defaults(root: Path, text: str, expected: str) -> None:
    path = job(root, text)
    assert error_of(path).startswith(f"{path}: {expected}")


def test_defaults_cycle(root: Path) -> None:
    write(root / "configs" / "train" / "a.yaml", "defaults: [train/b]\n")
    write(root / "configs" / "train" / "b.yaml", "defaults: [train/a]\n")
    message = error_of(job(root, "defaults: [train/a]\n"))
    assert "defaults form a cycle:" in message
    assert message.count("train/a.yaml") == 3 and "remove one of these entries" in message


# ---------------------------------------------------------------- errors: overrides


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=5", "command line override: unknown key 'train.stpes'; did you mean 'train.steps'?"),
    ("modl.lm.d_model=5", "command line override: unknown key 'modl'; did you mean 'model'?"),
    ("name.x=5", "command line override: name is a single value, not a section; write name=VALUE"),
    ("train.steps", "command line override 'train.steps' is malformed; expected key.path=value, e.g. train.steps=100"),
    ("=5", "command line override '=5' is malformed; expected key.path=value"),
    ("train..steps=5", "command line override 'train..steps=5' is malformed"),
    ("train.betas=[1,", "command line override 'train.betas=[1,': cannot read the value '[1,'"),
    ("train.steps=abc", "command line override: train.steps must be an integer, got 'abc' (str)"),
    ("model.adapter={kidn: none}", "command line override: unknown key 'model.adapter.kidn'; did you mean 'model.adapter.kind'?"),
])
def test_bad_override(root: Path, override: str, expected: str) -> None:
    assert error_of(job(root, "name: run\n"), (override,)).startswith(expected)


# ---------------------------------------------------------------- the loader only reads


def test_loading_never_writes(root: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}

    good = job(root, "defaults: [model/tiny, train/short]\n", "good.yaml")
    bad = job(root, "train: {steps: -1}\n", "bad.yaml")
    before = snapshot()
    load_job(good, ["train.steps=3"])
    dump_config(load_job(good))
    error_of(bad)
    error_of(root / "jobs" / "missing.yaml")
    assert snapshot() == before


# ---------------------------------------------------------------- what the repository ships


SHIPPED_JOBS = sorted((REPO / "jobs").glob("*.yaml"))
SHIPPED_FRAGMENTS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_JOBS or [None], ids=lambda p: p.name if p else "none")
def test_shipped_jobs_load(path: Path | None, tmp_path: Path) -> None:
    if path is None:
        pytest.skip("no jobs/*.yaml in the repository yet")
    cfg = load_job(path)
    assert load_job(write(tmp_path / "resolved.yaml", dump_config(cfg))) == cfg


@pytest.mark.parametrize("path", SHIPPED_FRAGMENTS or [None],
                         ids=lambda p: str(p.relative_to(REPO / "configs")) if p else "none")
def test_shipped_fragments_load_on_their_own(path: Path | None) -> None:
    """Each fragment should be valid on top of the defaults, so a typo in an unused one shows up."""
    if path is None:
        pytest.skip("no configs/**/*.yaml in the repository yet")
    load_job(path, configs_dir=REPO / "configs")



# Real-size jobs (the ones a researcher adapts to a cluster) say what they measure and on which
# datasets. A few measure themselves through their task on data.eval_cache instead; each says why.
REAL_SIZE = sorted(p for p in SHIPPED_JOBS
                   if any(tag in p.stem for tag in ("vitb16", "_base", "_large", "cc3m", "gptj"))
                   or p.stem == "magma_mae")
MEASURED_BY_THEIR_TASK = {
    "masked_adapters_mim_vitb16": "pretext stage: held-out masked-patch L1 (eval.mim_l1)",
    "masked_adapters_mlm_vitb16": "pretext stage: held-out masked-token accuracy (eval.mlm_accuracy)",
    "prompt_coop_vitb16": "base / new class top-1 on data.eval_cache (eval.prompt.*)",
    "prompt_structured_vitb16": "base / new class top-1 on data.eval_cache (eval.prompt.*)",
    "weak_reprogram_vitb16": "target-task top-1 through the label map on data.eval_cache",
    "weak_cross_modal_vitb16": "target-task top-1 through the label map on data.eval_cache",
    "vlmo_vqa_base": "VQA accuracy on the val2014 questions cache (eval.vqa_score)",
    "vlmo_nlvr2_base": "NLVR2 dev accuracy (eval.nlvr2_accuracy)",
}


@pytest.mark.parametrize("path", REAL_SIZE, ids=lambda p: p.name)
def test_real_size_jobs_name_their_suites_and_datasets(path: Path) -> None:
    cfg = load_job(path)
    if path.stem in MEASURED_BY_THEIR_TASK:
        assert cfg.data.eval_cache, f"{path.name}: {MEASURED_BY_THEIR_TASK[path.stem]} needs data.eval_cache"
        return
    assert cfg.eval.suites, f"{path.name} names no eval.suites (configs/eval/*.yaml has the usual ones)"
    for suite in cfg.eval.suites:
        assert suite.kind != "shapes", f"{path.name}: the shapes suite is for the synthetic data only"
        for d in suite.datasets:
            assert d.name != "heldout" or suite.kind == "captioning", (path.name, suite.kind, d.name)


def test_every_real_size_job_is_checked() -> None:
    assert len(REAL_SIZE) >= 15 and set(MEASURED_BY_THEIR_TASK) <= {p.stem for p in REAL_SIZE}
