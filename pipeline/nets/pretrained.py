"""Loading encoder weights from a LOCAL checkpoint file (no downloads).

Accepted files: whatever :func:`pipeline.io.checkpoints.read_state_dict` reads (a plain ``state_dict``, e.g.
torchvision's ``resnet18-*.pth`` with keys ``conv1.weight``, ``layer1.0...``, or a training checkpoint holding it
under ``"model"`` / ``"network"`` / ``"state_dict"``; read with ``weights_only=True``; ``"module."`` prefixes of
DataParallel / DDP stripped).

``fc.*`` keys and non-tensor entries (a network description) are ignored, and a 3-channel first convolution is
mapped to a 1-channel encoder by summing over the input channels (the response to a gray image repeated 3 times
is preserved exactly).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from pipeline.io.checkpoints import DDP_PREFIX, read_state_dict
from pipeline.user_errors import WeightsMismatchError

__all__ = ["WeightsMismatchError", "load_encoder_weights", "read_state_dict"]

_FIRST_CONV = "conv1.weight"


def _target_module(encoder: nn.Module) -> nn.Module:
    # ImageEncoder keeps its trunk under ``.net``; a bare MONAI/torchvision ResNet is used as is.
    return encoder.net if hasattr(encoder, "net") and isinstance(encoder.net, nn.Module) else encoder


def load_encoder_weights(
    encoder: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    prefix: str = "",
) -> dict[str, list[str]]:
    """Load a local ResNet-18 checkpoint into ``encoder`` (an :class:`ImageEncoder` or a bare ResNet).

    Args:
        encoder: target module; for an ``ImageEncoder`` the weights go into its ``.net`` trunk.
        path: local file.
        strict: if True, any missing or unexpected key (after the mapping below) is an error. If False,
            they are reported in the return value, but at least one tensor must load.
        prefix: only keys starting with ``prefix`` are used, with the prefix removed (e.g.
            ``"xray.net."`` to take the radiograph trunk out of a saved :class:`DualEncoder`; a leading
            ``"module."`` is dropped, as it is from the keys).

    Mapping: a leading ``"module."`` is removed; ``fc.*`` keys and non-tensor entries are ignored; a 3-channel
    ``conv1.weight`` is summed over its input channels when the encoder has 1 input channel.

    Returns:
        ``{"missing": [...], "unexpected": [...], "converted": [...]}`` (keys).

    Raises:
        FileNotFoundError: no such file (:class:`pipeline.user_errors.CheckpointNotFoundError`; the other
            :class:`~pipeline.user_errors.CheckpointError` subclasses for unreadable files).
        WeightsMismatchError: shape mismatches (always), missing/unexpected keys (``strict``), or no
            matching key at all; the message names the file and the offending keys and shapes.
    """
    path = os.fspath(path)
    src = read_state_dict(path)
    prefix = prefix[len(DDP_PREFIX):] if prefix.startswith(DDP_PREFIX) else prefix
    src = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    src = {k: v for k, v in src.items() if not (k == "fc" or k.startswith("fc."))}

    target = _target_module(encoder)
    own = target.state_dict()
    converted: list[str] = []
    if _FIRST_CONV in src and _FIRST_CONV in own:
        w, t = src[_FIRST_CONV], own[_FIRST_CONV]
        if w.ndim == t.ndim and w.shape[1] == 3 and t.shape[1] == 1 and w.shape[0] == t.shape[0]:
            src[_FIRST_CONV] = w.sum(dim=1, keepdim=True)
            converted.append(_FIRST_CONV)

    # keys in the encoder's own (network) order, so the first reported ones are the earliest layers
    missing = [k for k in own if k not in src]
    unexpected = [k for k in src if k not in own]
    shape_errors = [
        f"{k}: file {tuple(src[k].shape)} vs encoder {tuple(own[k].shape)}"
        for k in own
        if k in src and tuple(src[k].shape) != tuple(own[k].shape)
    ]
    problems: list[str] = []
    if shape_errors:
        problems.append(
            "shape mismatches: " + "; ".join(shape_errors[:10]) + (" ..." if len(shape_errors) > 10 else "")
        )
    if strict and missing:
        problems.append(
            f"missing keys ({len(missing)}): {missing[:10]}" + (" ..." if len(missing) > 10 else "")
        )
    if strict and unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): {unexpected[:10]}"
            + (" ..." if len(unexpected) > 10 else "")
        )
    if not any(k in own for k in src):
        problems.append(f"no key of the file matches the encoder (file keys start with {sorted(src)[:3]})")
    if problems:
        raise WeightsMismatchError(
            f"checkpoint {path} does not fit {type(encoder).__name__}: " + " | ".join(problems)
        )

    own_dtypes = {k: v.dtype for k, v in own.items()}
    to_load = {k: v.to(own_dtypes[k]) for k, v in src.items() if k in own}
    target.load_state_dict(to_load, strict=False)
    return {"missing": missing, "unexpected": unexpected, "converted": converted}
