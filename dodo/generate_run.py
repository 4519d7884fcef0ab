"""`dodo generate RUN --image PATH [--prompt TEXT] [--image PATH ...]`: text from a trained MAGMA run.

The --image and --prompt flags, in the order given, are the prompt: one image captions it;
``--image a.jpg --prompt "A picture of" --image b.jpg ...`` is MAGMA's interleaved few-shot
input (image, text, image, text, image), each image as its prefix, each text as its tokens.
The run's model is rebuilt from its config.yaml (its frozen base from the configured sources
or model.init_seed) with the newest checkpoint's trainable state, as `dodo eval` / `dodo
export` do. Images are read with PIL and resized to data.image_size as the run's training
cache was (its manifest's resize mode; center-crop, `dodo data cache`'s default, when the
cache is not readable here), then normalised as the collator does.

Decoding: greedy by default; ``--beam N`` (N > 1) beam search; any of --temperature /
--top-k / --top-p samples (seeded by --seed). All with the KV cache (dodo/eval/generate.py).
Bad input (no checkpoint, another family, an unreadable image, contradictory options) is one
``dodo: error:`` line, exit 2, checked before the model is built where it can be.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from dodo.config.errors import ConfigError

IMAGE, TEXT = "image", "prompt"


class OrderedPart(argparse.Action):
    """--image / --prompt append (kind, value) to one list, so the command line's order is kept."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parts = list(getattr(namespace, self.dest, None) or [])
        parts.append((IMAGE if option_string == "--image" else TEXT, values))
        setattr(namespace, self.dest, parts)


def add_parser(sub: Any) -> None:
    """The `generate` subcommand (called from dodo/cli.py; torch-free)."""
    g = sub.add_parser("generate", help="caption images / continue an interleaved image-text prompt with a MAGMA run")
    g.add_argument("run", help="a MAGMA run directory with a checkpoint")
    g.add_argument("--image", action=OrderedPart, dest="parts", metavar="PATH",
                   help="an image file (repeatable; with --prompt, in command-line order)")
    g.add_argument("--prompt", action=OrderedPart, dest="parts", metavar="TEXT",
                   help="text after the image before it (repeatable: few-shot examples)")
    g.add_argument("--max-new-tokens", type=int, default=0, help="0: the run's data.max_caption_tokens")
    g.add_argument("--beam", type=int, default=1, metavar="N", help="beam search of N beams (1: off)")
    g.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of mass p")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda[:N]")


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as dodo.eval.generate.Decoding's fields (torch-free checks)."""
    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.beam < 1:
        raise ConfigError(f"--beam {args.beam}: must be >= 1 (1 = no beam search)")
    if args.beam > 1 and sample:
        raise ConfigError("--beam and --temperature / --top-k / --top-p exclude each other: "
                          "choose beam search or sampling")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1 (0 = the run's default)")
    if args.temperature is not None and args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature}: must be > 0 (greedy: leave the sampling flags out)")
    if args.top_k is not None and args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 = off)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: must be in (0, 1]")
    out: dict[str, Any] = {"method": "beam" if args.beam > 1 else "sample" if sample else "greedy",
                           "beams": args.beam, "seed": args.seed}
    if args.temperature is not None:
        out["temperature"] = args.temperature
    if args.top_k is not None:
        out["top_k"] = args.top_k
    if args.top_p is not None:
        out["top_p"] = args.top_p
    if args.max_new_tokens:
        out["max_tokens"] = args.max_new_tokens
    return out


def read_images(parts: Sequence[tuple[str, str]]) -> dict[int, Any]:
    """Index in ``parts`` -> the decoded RGB PIL image; one clear error per unreadable file."""
    from dodo.data.ingest.images import BadSample, decode

    images = {}
    for i, (kind, value) in enumerate(parts):
        if kind != IMAGE:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"--image {value}: no such file; give the path of an image file (JPEG, PNG, ...)")
        try:
            images[i] = decode(path.read_bytes())
        except BadSample as err:
            raise ConfigError(f"--image {value}: PIL cannot read it as an image ({err.reason}); "
                              "give a JPEG / PNG / any format Pillow opens") from None
    if not images:
        raise ConfigError("give at least one --image PATH (MAGMA generates text after an image)")
    return images


def resize_mode(cfg: Any) -> str:
    """The resize mode of the run's training cache (its manifest's options), else center-crop."""
    from dodo.data.manifest import CacheError, describe

    if cfg.data.kind == "synthetic" or not cfg.data.train_cache:
        return "stretch"  # the generator draws at data.image_size; nothing to crop
    try:
        return str(describe(cfg.data.train_cache).options.get("resize", "center-crop"))
    except CacheError:
        return "center-crop"


def open_run(run_dir: str) -> tuple[Any, Any, Any]:
    """(RunDir, job config, newest checkpoint) of a MAGMA run with a checkpoint (torch-free)."""
    from dodo.config.loader import load_job
    from dodo.rundir import RunDir
    from dodo.train.checkpoint_index import latest

    from dodo.models.registry import family

    run = RunDir.open(run_dir)
    cfg = load_job(run.config)
    if "generate" not in family(cfg.model.family).eval_hooks:  # the captioning families (MAGMA)
        raise ConfigError(f"{run.path}: model.family={cfg.model.family} does not generate text; "
                          "`dodo generate` is for MAGMA runs (model.family=magma); use `dodo eval` for this run")
    ckpt = latest(run)
    if ckpt is None:
        raise ConfigError(f"{run.path} has no published checkpoint yet; train it first "
                          f"(`dodo submit {run.path}` resumes it)")
    return run, cfg, ckpt


def load_model(run: Any, cfg: Any, ckpt: Any, device: str) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer): the run's model with the checkpoint's state."""
    import torch

    from dodo.data.tokenizer import load_tokenizer
    from dodo.tasks import build_family_model
    from dodo.train.init_from import read_init

    torch.manual_seed(cfg.model.init_seed)  # the frozen random-init base, as in training
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    model = build_family_model(cfg.model, tokenizer, read_init(cfg))
    state = torch.load(ckpt.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise ConfigError(f"{ckpt.path} does not fit the model of {run.config}: unexpected "
                          f"{sorted(unexpected)[:3]}, missing {sorted(trainable & set(missing))[:3]}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def generate_run(run_dir: str, parts: Sequence[tuple[str, str]], options: dict[str, Any],
                 device: str = "auto") -> str:
    """The text a MAGMA run generates after the interleaved prompt ``parts`` ((kind, value),
    kind "image" (a file) or "prompt" (text), in order)."""
    run, cfg, ckpt = open_run(run_dir)  # the cheap checks first, then the images,
    images = read_images(parts)  # then the (slow) model build
    import numpy as np
    import torch

    from dodo.data.collate import CaptionCollator
    from dodo.data.ingest.images import resize
    from dodo.eval.generate import Decoding, decode, embed_interleaved
    from dodo.tasks.encoders import to_model_images

    model, tokenizer = load_model(run, cfg, ckpt, device)
    collate = CaptionCollator(tokenizer, cfg.data.max_caption_tokens)  # the task's normalisation
    mode, size = resize_mode(cfg), cfg.data.image_size
    dev = next(model.parameters()).device
    prompt: list[Any] = []
    for i, (kind, value) in enumerate(parts):
        if kind == IMAGE:
            pixels = np.array(resize(images[i], size, mode), dtype=np.uint8)[None]  # (1, H, W, 3), writable
            prompt.append(to_model_images(pixels, collate.image_mean, collate.image_std)[0].to(dev))
        else:
            prompt.append(value)
    settings = Decoding(**{"max_tokens": cfg.data.max_caption_tokens, **options})
    with torch.no_grad():
        embeds, ids = embed_interleaved(model, prompt, tokenizer, return_ids=True)  # (1, L, d), (1, L)
        context = getattr(model.lm.config, "n_positions", None) or getattr(model.lm.config, "max_position_embeddings", 0)
        if context and embeds.shape[1] + settings.max_tokens > context:
            n_img = int((ids == -1).sum())
            raise ConfigError(f"the prompt is {embeds.shape[1]} positions ({n_img} of images, "
                              f"{embeds.shape[1] - n_img} of text) and --max-new-tokens is {settings.max_tokens}: "
                              f"more than the LM's context of {context}; use fewer images / shorter prompts "
                              "or a smaller --max-new-tokens")
        (tokens,) = decode(model, embeds, settings, ids)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def cmd_generate(args: argparse.Namespace) -> int:
    options = decoding_options(args)
    text = generate_run(args.run, args.parts or [], options, args.device)
    print(text, flush=True)
    return 0
