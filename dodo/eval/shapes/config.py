"""The shapes suite's defaults, as plain constants: the config layer (dodo/eval/config.py) reads
them, and they are the only shapes words outside the generator and the shapes suite."""

from __future__ import annotations

# Each colour loses one shape and each shape two colours: a compositional shift, every word
# of an OOD caption is seen in training but never in that combination.
DEFAULT_HOLDOUT = ["red square", "green triangle", "blue circle", "yellow triangle", "purple circle",
                   "white square"]
# Zero-shot prompt templates for the shapes data: averaging over size and position leaves
# the class ("red circle").
DEFAULT_TEMPLATES = [f"a {size} {{}} in the {pos}" for size in ("small", "large")
                     for pos in ("top left", "top right", "bottom left", "bottom right", "center")]
