"""The language adapter: CLIP in another language through a frozen target-language encoder.

A frozen Hugging Face BERT-like encoder of the target language reads the text; a small adapter
(down map, 1-2 transformer layers, pool, up map) maps its tokens into frozen CLIP's text
embedding space, trained by a distance (MSE or 1 - cosine) to CLIP's English text features of
the translation. Images and zero-shot / retrieval go through CLIP's frozen vision tower.

config.py   LangAdapterModelConfig (model.clip: the frozen CLIP; model.lang_adapter), submit checks
model.py    LanguageAdapter (frozen encoder + adapter, frozen CLIP teacher / vision tower)
task.py     parallel-text training, held-out distance and translation retrieval, the suites' hooks
"""

from __future__ import annotations

from dodo.models.lang_adapter.config import REFUSED_ADAPTERS, LangAdapterConfig, LangAdapterModelConfig, validate_job
from dodo.models.registry import FamilySpec, register

__all__ = ["FAMILY", "LangAdapterConfig", "LangAdapterModelConfig"]


FAMILY = register(FamilySpec(
    name="lang_adapter",
    config=LangAdapterModelConfig,
    model="dodo.models.lang_adapter.model:build",
    task="dodo.models.lang_adapter.task:build_task",
    eval_hooks=("encode_images", "encode_texts"),  # texts: the target language, through the adapter
    default_suites=(),  # the held-out data is parallel text: its metrics are the task's own
    refused_adapters=REFUSED_ADAPTERS,
    validate=validate_job,
    adapter_sites="its own adapter after the frozen target-language encoder (lang_adapter.down / layers / up); "
                  "no adapters inside the frozen towers",
))
