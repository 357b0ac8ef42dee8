"""Model size of each method: parameters and inference compute per knee (``torch.utils.flop_counter``).

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one ``1 x 1 x S x S`` input
(convolutions, matrix products, attention; a multiply-add counts as 2 FLOPs). The MRIS paper's "FLOPs"
(4.8 G for MRIS at 256 px) are multiply-accumulates of the two encoders (thop-style), so the table gives
both GFLOPs and GMACs = GFLOPs / 2.

What is counted per method: MRIS — parameters of every encoder (radiograph and map encoders; MRIS-S has
two pairs), inference = the radiograph encoder(s) on one ROI (database embeddings are precomputed; the
k-NN search adds ``N x D`` MACs, listed separately); direct synthesis — the generator (pix2pix parameters
include the discriminator, used only in training); classifiers — one ResNet-18 on the 2-channel maps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.mris.network import count_parameters

__all__ = ["count_flops", "model_size_row"]


def count_flops(model: torch.nn.Module, inputs: Sequence[torch.Tensor] | torch.Tensor) -> int:
    """FLOPs of one forward pass of a COPY of ``model`` (eval mode, gradients enabled so that PyTorch's
    fused transformer inference kernels, which the counter does not see, are not used)."""
    m = copy.deepcopy(model).eval()
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        m(*args)
    return int(counter.get_total_flops())


def model_size_row(method: str, params: Sequence[torch.nn.Module], inference: Sequence[tuple[torch.nn.Module, tuple]],
                   note: str = "") -> dict:
    """One table row: ``params_M`` (parameters of ``params`` modules, millions), ``inference_GFLOPs`` and
    ``inference_GMACs`` (summed over the ``(module, inputs)`` pairs of ``inference``)."""
    n = sum(count_parameters(p) for p in params)
    flops = sum(count_flops(m, x) for m, x in inference)
    return {"method": method, "params_M": n / 1e6, "inference_GFLOPs": flops / 1e9,
            "inference_GMACs": flops / 2e9, "note": note}
