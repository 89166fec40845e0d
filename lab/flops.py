"""
FLOPs counted, not estimated: torch's FlopCounterMode around a real call, attention included.

    with flop_counter() as counter: ...       # any forward or backward
    decode_flops(model, idx_next, cache)      # one decode step: {"layers", "head"}
    step_flops(model, batch, ctx)             # one training step's forward and backward

Used by sample.py's --stats and by the experiments (lab/measure.py). It imports nothing of the
project.
"""

from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# torch's FlopCounterMode has no formula for the CPU flash-attention kernels SDPA uses; give them
# the same formulas as for the GPU kernels, so attention is counted on every device.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
             lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
             lambda grad, q, k, v, *args, out_shape=None, **kwargs:
             sdpa_backward_flop_count(grad, q, k, v)}


def flop_counter():
    """A FlopCounterMode that counts attention on the CPU too (use: with flop_counter() as c)."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)


@torch.no_grad()
def decode_flops(model, idx_next, cache):
    """FLOPs of one decode step, split into the layers and the LM head (the head costs the same
    for every arch). Feeds idx_next into the cache like an ordinary decode step."""
    with flop_counter() as counter:
        model.decode(idx_next, cache)
    total = counter.get_total_flops()
    # Counts are keyed by module path; the only Linear called outside a block is the LM head.
    head = sum(counter.get_flop_counts().get("Linear", {}).values())
    return {"layers": total - head, "head": head}


def step_flops(model, batch, ctx=None):
    """FLOPs of one training step's forward and backward on batch (the optimizer's elementwise
    update is no matrix product and is not counted). The gradients are dropped after."""
    with flop_counter() as counter:
        with ctx or nullcontext():
            loss = model(batch)[1]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
