"""dodo's fused kernels for the adapter and router hot paths (docs/kernels.md).

Installed under the import name ``dodo_kernels`` (setup.cfg maps the kernels/ folder to it);
every op has a plain PyTorch reference beside it, chosen automatically where Triton cannot
run (CPU, POWER9, no Triton) or forced with DODO_KERNELS=reference|triton (dispatch.py).
"""

if __name__ == "dodo_kernels":
    from .bottleneck import MAX_HIDDEN, bottleneck_adapter, bottleneck_reference
    from .dispatch import KernelUnavailable, use_triton
    from .lora import lora, lora_reference
    from .moe import moe_adapter_experts, moe_experts_reference
    from .router import Routing, route_topk, route_topk_reference

    __all__ = ["MAX_HIDDEN", "KernelUnavailable", "Routing", "bottleneck_adapter", "bottleneck_reference",
               "lora", "lora_reference", "moe_adapter_experts", "moe_experts_reference",
               "route_topk", "route_topk_reference", "use_triton"]
# Imported under any other name (e.g. as a top-level `kernels` because the repo root is on
# sys.path while transformers probes for the PyPI `kernels` package) the package stays empty:
# registering the torch.library ops twice would fail.
