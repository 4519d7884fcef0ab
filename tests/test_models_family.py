"""The family seam: one FamilySpec per family folder, found by model.family; each job's config
holds its own family's keys only; rank-start-up checks refused at submit; layers depend one way."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from conftest import REPO, dodo
from dodo.config.errors import ConfigError
from dodo.config.loader import dump_config, load_job
from dodo.models import registry
from dodo.models.config import ModelConfig

JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- registry and specs


@pytest.mark.parametrize("name", registry.BUILTIN)
def test_each_family_folder_exports_one_registered_spec(name: str):
    import importlib

    spec = registry.family(name)
    assert importlib.import_module(f"dodo.models.{name}").FAMILY is spec and spec.name == name
    assert issubclass(spec.config, ModelConfig) and spec.config().family == name
    for ref in (spec.model, spec.task):  # references resolve to callables
        assert callable(registry.resolve(ref)), ref
    for flavour, fragment in spec.flavours.items():  # size flavours: configs/model/<fragment>.yaml
        path = REPO / "configs" / f"{fragment}.yaml"
        assert path.is_file(), (flavour, path)
        assert "family: " + name in path.read_text()
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(dataclasses.replace(spec))
    from dodo.eval.suites import KINDS

    task_class = {"magma": "dodo.models.magma.task:CaptioningTask", "clip": "dodo.tasks.contrastive:ContrastiveTask",
                  "vlmo": "dodo.models.vlmo.task:VlmoRetrievalTask",
                  "prompt": "dodo.models.prompt.task:PromptTask",
                  "weak": "dodo.models.weak.task:MAEContrastiveTask",
                  "lang_adapter": "dodo.models.lang_adapter.task:LangAdapterTask"}[name]
    assert spec.eval_hooks and all(callable(getattr(registry.resolve(task_class), h)) for h in spec.eval_hooks)
    assert all(k in KINDS and set(KINDS[k].hooks) <= set(spec.eval_hooks) for k in spec.default_suites)


def test_no_module_outside_the_registry_switches_on_the_family_name():
    hits = []
    for path in (REPO / "dodo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and "family" in ast.unparse(node.left) \
                    and any(isinstance(c, ast.Constant) and isinstance(c.value, str) for c in ast.walk(node)):
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert hits == []


# ---------------------------------------------------------------- one family's section per job


@pytest.mark.parametrize("job, own, foreign", [
    ("demo.yaml", ["lm", "image_encoder", "prefix_dropout"], ["clip", "vlmo"]),
    ("clip_lora.yaml", ["clip"], ["lm", "image_encoder", "prefix_dropout", "vlmo"]),
    ("vlmo_retrieval.yaml", ["vlmo"], ["lm", "image_encoder", "prefix_dropout", "clip"]),
])
def test_resolved_config_holds_only_its_family_keys(tmp_path: Path, job: str, own: list[str], foreign: list[str]):
    import yaml

    cfg = load_job(REPO / "jobs" / job)
    text = dump_config(cfg)
    model = yaml.safe_load(text)["model"]
    assert all(k in model for k in own) and not any(k in model for k in foreign), sorted(model)
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_job(tmp_path / "resolved.yaml") == cfg  # still a valid job file


@pytest.mark.parametrize("override, fix", [
    ("model.clip.loss=mpm_nce", "model.clip: belongs to model.family=clip, but this job's model.family is magma; "
                                "remove model.clip"),
    ("model.vlmo.rerank_k=2", "model.vlmo: belongs to model.family=vlmo"),
    ("model.family=nope", "model.family: must name a registered model family (clip, lang_adapter, magma, prompt, vlmo, weak), got 'nope'"),
])
def test_another_familys_key_is_an_error_naming_the_fix(override: str, fix: str):
    with pytest.raises(ConfigError, match="^command line override: " + fix.replace("(", r"\(").replace(")", r"\)")):
        load_job(REPO / "jobs/demo.yaml", [override])


def test_switching_family_by_override_takes_the_new_familys_keys():
    cfg = load_job(REPO / "jobs/clip_lora.yaml", ["model.clip.objective=mim", "model.init_seed=3"])
    assert type(cfg.model).__name__ == "ClipModelConfig" and cfg.model.clip.objective == "mim"
    with pytest.raises(ConfigError, match="model.lm: belongs to model.family=magma"):
        load_job(REPO / "jobs/clip_lora.yaml", ["model.lm.d_model=64"])


# ---------------------------------------------------------------- submit-time checks (real CLI)


@pytest.mark.parametrize("args, expected", [
    (["jobs/vlmo_retrieval.yaml", "model.adapter.kind=prefix"],
     "model.adapter.kind: is prefix, but model.family=vlmo does not take prefix adapters"),
    (["jobs/vlmo_retrieval.yaml", "model.adapter.kind=film"], "model.family=vlmo does not take film adapters"),
    (["jobs/clip_lora.yaml", "model.adapter.kind=film", "model.adapter.film.condition=image"],
     "model.adapter.film.condition: is image, which would make one tower depend on the other's input"),
    (["jobs/demo.yaml", "model.adapter.kind=film", "model.adapter.film.condition=text"],
     "model.adapter.film.condition: is text, which MAGMA does not build"),
    (["jobs/demo.yaml", "model.adapter.kind=mam", "model.adapter.placement=sequential"],
     "model.adapter.placement=sequential: is sequential, but kind=mam pairs prefix tuning with a parallel adapter"),
    (["jobs/vlmo_retrieval.yaml", "data.image_size=64"], "data.image_size: is 64, but model.vlmo.image_size=32"),
    (["jobs/vlmo_retrieval.yaml", "model.vlmo.max_text_len=8"],
     "data.max_caption_tokens: is 16, more than model.vlmo.max_text_len=8 text positions"),
    (["jobs/moe_demo.yaml", "model.moe.layers=[0, 7]"],
     "model.moe.layers: has 7, but the LM has model.lm.n_layer=2 blocks; use indices in [-2, 1]"),
    (["jobs/moe_demo.yaml", "model.adapter.layers=[0]", "model.moe.layers=[1]"],
     "includes LM block(s) [1], which have no bottleneck adapter"),
    (["jobs/demo.yaml", "train.precision=fp16"],
     "train.precision: is fp16, which needs a GPU, but cluster.gpus_per_task=0"),
])
def test_rank_start_up_checks_are_refused_at_submit(workdir: Path, args: list[str], expected: str):
    before = tree(workdir)
    proc = dodo("submit", *args, f"runs_dir={workdir}/runs", cwd=workdir, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dodo: error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert tree(workdir) == before  # nothing written


@pytest.mark.parametrize("job", JOBS)
def test_every_job_dry_runs(workdir: Path, job: str):
    before = tree(workdir)
    proc = dodo("submit", f"jobs/{job}", "--dry-run", cwd=workdir, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert tree(workdir) == before


# ---------------------------------------------------------------- layers depend one way

LAYERS = ["config", "cluster", "data/models", "tasks", "train", "cli"]
# Config-level modules (torch-free, read at submit) of every area sit with dodo.config.
# The torch-free readers of on-disk facts that submit-time checks use (a cache's manifest, class
# name lists) are config-level too: a family's validate hook reads them before anything starts.
CONFIG_LEVEL = {"dodo", "dodo.rundir", "dodo.exitcodes", "dodo.models.registry",
                "dodo.data.manifest", "dodo.data.store", "dodo.data.decode", "dodo.eval.classnames",
                "dodo.models.clip.class_text"}  # torch-free: class-template texts and their submit check
CLI_LEVEL = {"dodo.cli", "dodo.__main__", "dodo.status", "dodo.eval.run", "dodo.export", "dodo.generate_run"}
# Imports against the direction that other areas still have (module -> imported module), to be
# removed by their owners as they are fixed; none may be added for new code.
KNOWN = {
    ("dodo.cluster.sweep", "dodo.status"),
    ("dodo.config.loader", "dodo.cluster.profiles"),
    ("dodo.config.schema", "dodo.moe.planner"),
    ("dodo.data.config", "dodo.data.decode"),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module in CONFIG_LEVEL or module.startswith("dodo.config") or parts[-1] == "config":
        return "config"
    if len(parts) == 3 and parts[1] == "models" and parts[2] in registry.BUILTIN:
        return "config"  # a family's spec: torch-free declarations
    if module in CLI_LEVEL:
        return "cli"
    if module.startswith("dodo.train"):
        return "train"
    if module.startswith(("dodo.tasks", "dodo.eval")) or (parts[1:2] == ["models"] and parts[-1].startswith("task")):
        return "tasks"  # the family task modules (dodo/models/<family>/task*.py) are tasks-layer code
    if module.startswith("dodo.cluster"):
        return "cluster"
    return "data/models"


def upward_imports() -> set[tuple[str, str]]:
    files = sorted((REPO / "dodo").rglob("*.py"))
    known = {_module(f) for f in files}
    found = set()
    for f in files:
        me = _module(f)
        for node in ast.walk(ast.parse(f.read_text())):  # lazy imports inside functions count too
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and LAYERS.index(layer_of(name)) > LAYERS.index(layer_of(me)):
                    found.add((me, name))
    return found


def test_layers_depend_one_way():
    found = upward_imports()
    assert found - KNOWN == set(), "a lower layer imports a higher one (STYLE.md 16)"
    assert layer_of("dodo.models.magma.model") == "data/models" and layer_of("dodo.models.clip.task") == "tasks"
    assert not any(me.startswith(("dodo.models", "dodo.adapters", "dodo.moe")) for me, _ in found)


# ---------------------------------------------------------------- task hooks on natural captions


def natural_samples(n: int, labels: bool) -> list:
    import numpy as np

    from dodo.data.sample import Sample

    rng = np.random.default_rng(0)
    words = ["a man riding a bike on a city street", "two dogs playing in the snow", "a bowl of soup on a table"]
    return [Sample(image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), caption=words[i % 3], key=f"n{i}",
                   image_id=i, label=i % 3 if labels else -1) for i in range(n)]


@pytest.fixture(scope="module")
def clip_task():
    import torch

    from dodo.tasks import build_task

    torch.manual_seed(0)
    return build_task(load_job(REPO / "jobs/clip_lora.yaml", ["data.kind=synthetic", "data.num_train=32",
                                                               "data.num_eval=16", "eval.ood_holdout=[]"]))


def test_contrastive_encoders_match_the_training_path(clip_task):
    import numpy as np
    import torch

    model = clip_task.model.eval()
    samples = natural_samples(5, labels=False)
    batch = clip_task.collate(samples)  # the training path: collator -> model
    with torch.no_grad():
        want_img = model.encode_image(batch["images"])
        want_txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    for images in (np.stack([s.image for s in samples]), [s.image for s in samples], batch["images"]):
        torch.testing.assert_close(clip_task.encode_images(model, images), want_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip_task.encode_texts(model, [s.caption for s in samples]), want_txt)
    assert clip_task.encode_images(model, samples[0].image[None]).shape == (1, want_img.shape[1])


def test_contrastive_task_on_natural_captions_scores_no_shapes_classes(clip_task):
    task, model = clip_task, clip_task.model
    task.eval_set, task.train_set = natural_samples(12, labels=False), natural_samples(12, labels=False)
    metrics = task.evaluate(model, 8, 0, 1)
    assert "eval.id.r_mean" in metrics and not any("zeroshot" in k for k in metrics)
    assert task.final_report(model) == ({}, ["kNN: skipped, the data has no labels"])
    task.eval_set, task.train_set = natural_samples(12, labels=True), natural_samples(24, labels=True)
    extra, _ = task.final_report(model)  # kNN over the data's own labels
    assert 0.0 <= extra["eval.id.knn_accuracy"] <= 1.0


def test_magma_report_on_natural_captions_lists_them_and_generates_by_decoding():
    import torch

    from dodo.tasks import build_task

    torch.manual_seed(0)
    task = build_task(load_job(REPO / "jobs/demo.yaml", ["data.kind=synthetic", "data.num_train=16", "data.num_eval=8",
                                                          "train.caption_samples=3", "model.lm.d_model=32",
                                                          "model.lm.n_head=2", "model.image_encoder.hidden=32"]))
    task.eval_set = natural_samples(3, labels=False)
    extra, lines = task.final_report(task.model)
    assert extra == {} and len(lines) == 4 and "reference: 'a man riding a bike on a city street'" in lines[1]
    images = [s.image for s in task.eval_set]
    greedy = task.generate(task.model.eval(), images, max_tokens=4)
    assert greedy == task.generate(task.model, images, method="beam", beams=1, max_tokens=4)
    assert len(task.generate(task.model, images, prompt="a photo of", method="sample", top_k=5, max_tokens=3)) == 3


@pytest.mark.parametrize("loss", ["infonce", "mpm_nce"])
def test_contrastive_positives_come_from_image_ids_when_the_batch_has_them(loss: str):
    import torch

    from dodo import losses
    from dodo.models.clip.config import ClipConfig, ClipModelConfig
    from dodo.models.clip.model import ClipDualEncoder

    torch.manual_seed(0)
    model = ClipDualEncoder(ClipModelConfig(clip=ClipConfig(loss=loss)), vocab_size=40, eos_token_id=0).eval()
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(1, 40, (4, 6))  # four different captions
    mask = torch.ones_like(ids)
    image_ids = torch.tensor([7, 7, 3, 5])  # captions 0 and 1 describe the same image
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids, mask)
        scale = model.clip.logit_scale.exp().clamp(max=100.0)
        if loss == "infonce":
            want = losses.info_nce(img, txt, scale, positive_ids=image_ids)
            assert float(model(images, ids, mask, image_ids=torch.arange(4))) == pytest.approx(
                float(model(images, ids, mask)), rel=1e-6)  # distinct ids: CLIP's loss exactly
        else:
            c = model.cfg
            want = losses.mpm_nce(img, txt, losses.positives_from_ids(image_ids), c.mpm_eps, c.mpm_delta, c.mpm_tau)
        got = model(images, ids, mask, image_ids=image_ids)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) != pytest.approx(float(model(images, ids, mask)), rel=1e-4)  # the ids matter
