"""Suite results as the robustness papers tabulate them (torch-free: `dodo table` reads them).

The helpers live in dodo/config/metric_keys.py, a config-level module, so that `dodo table`
(cluster layer) can use them without importing dodo.eval (layers depend one way); this module
re-exports them for the eval code and its tests.
"""

from __future__ import annotations

from dodo.config.metric_keys import (OOD_MEAN, column_label, dataset_tags, order_metric_keys,  # noqa: F401
                                     split_key)

__all__ = ["OOD_MEAN", "column_label", "dataset_tags", "order_metric_keys", "split_key"]
