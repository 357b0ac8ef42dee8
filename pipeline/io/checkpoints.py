"""Model checkpoints: ONE reader, ONE loader, and networks rebuilt from the description their checkpoint holds.

* :func:`read_state_dict`: the network state dict of a checkpoint file: a bare state dict (``model.pt`` written
  by MONAI's ``CheckpointSaver`` or ``torch.save(net.state_dict())``), or a dict holding it under ``"model"`` /
  ``"network"`` / ``"state_dict"`` (``checkpoint_final.pt`` with optimiser and trainer state); the ``module.``
  prefix of ``DataParallel`` / ``DistributedDataParallel`` is stripped. Read with ``weights_only=True``.
* :func:`load_weights`: that state dict into a network you built (:func:`unwrap` is applied).
* :func:`load_network`: build the network the checkpoint describes (:mod:`pipeline.nets.describe`) and load it;
  checkpoints written before networks described themselves are loaded into ``fallback`` built from the settings
  you give.
* :func:`network_settings`: the architecture settings and expected preprocessing of a (loaded) network, checked
  against settings given by a user.
* :func:`checkpoint_hash`: sha256 identifying a checkpoint file or state dict (stamped on embedding databases
  and inference results).

Every problem raises one :class:`pipeline.user_errors.CheckpointError` subclass with a one-line message that
names the file: :class:`~pipeline.user_errors.CheckpointNotFoundError` (no file; also a ``FileNotFoundError``),
:class:`~pipeline.user_errors.CheckpointReadError` (truncated, or not a torch file),
:class:`~pipeline.user_errors.NoStateDictError`, :class:`~pipeline.user_errors.WeightsMismatchError` (which keys /
shapes, and which settings to check), :class:`~pipeline.user_errors.SettingsMismatchError` (the checkpoint's
description contradicts the network or the settings given), :class:`~pipeline.user_errors.NoDescriptionError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from pipeline.nets.describe import (
    DescribedModule,
    check_given,
    describe_values,
    merge_descriptions,
    normalise_description,
    resolve_factory,
)
from pipeline.user_errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    NoDescriptionError,
    NoStateDictError,
    SettingsMismatchError,
    WeightsMismatchError,
)

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CheckpointReadError", "DDP_PREFIX", "EXTRA_STATE", "NoDescriptionError",
    "checkpoint_hash",
    "NoStateDictError", "SettingsMismatchError", "WeightsMismatchError", "description_of", "load_network",
    "load_weights", "network_settings", "read_state_dict", "unwrap",
]

PathLike = Union[str, os.PathLike]
#: Keys under which training checkpoints nest the network state dict (first match wins).
NESTED_KEYS = ("model", "network", "state_dict")
#: State-dict key of a module's extra state (where a network keeps its description).
EXTRA_STATE = "_extra_state"
DDP_PREFIX = "module."
_SHOW = 5  # keys / shapes listed in a message


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` (or ``network`` itself)."""
    return network.module if isinstance(getattr(network, "module", None), nn.Module) else network


def _hint(train: Optional[str]) -> str:
    return f" Train one with `{train}`, or pass --checkpoint PATH." if train else ""


def _one_line(text: Any, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _unreadable_kind(p: Path) -> str:
    """Why torch cannot read ``p``, from its first bytes: truncated (a torch zip / pickle cut short), empty, or not
    a checkpoint at all (text, another format)."""
    import zipfile

    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    if size == 0:
        return "not a checkpoint: the file is empty (0 bytes; an interrupted copy or save?)"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(p):
            return f"truncated checkpoint: a torch.save zip archive cut short ({size} bytes); copy or save it again"
        return "not a readable torch checkpoint: a zip archive without a valid torch.save layout"
    if head[:1] == b"\x80":
        return f"truncated or corrupt checkpoint: a legacy torch.save pickle that cannot be read ({size} bytes)"
    try:
        text = head.decode("utf-8")
        return f"not a checkpoint: a text file (starts with {text[:30]!r})"
    except UnicodeDecodeError:
        return f"not a checkpoint: not a file written by torch.save (starts with bytes {head[:8].hex()})"


def read_state_dict(path: PathLike, train: Optional[str] = None) -> dict[str, Any]:
    """The network state dict stored in the checkpoint file ``path`` (module docstring), keys without ``module.``.

    ``train``: the command that writes such a checkpoint, quoted when the file is missing.
    """
    p = Path(os.fspath(path))
    if not p.is_file():
        raise CheckpointNotFoundError(f"checkpoint not found: {p}.{_hint(train)}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a usable checkpoint file"
        raise CheckpointReadError(f"{p}: {_unreadable_kind(p)} ({type(e).__name__}: {_one_line(e) or 'no detail'})."
                                  f"{_hint(train)}") from None
    if isinstance(obj, Mapping):
        obj = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        got = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise NoStateDictError(f"{p}: no network state dict inside (tensors, bare or under "
                               f"{' / '.join(map(repr, NESTED_KEYS))}); found {got}")
    keys = [str(k) for k in obj]
    return {(k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k): v for k, v in zip(keys, obj.values())}


def description_of(network_or_state: Union[nn.Module, Mapping[str, Any]], source: str = "the checkpoint"
                   ) -> Optional[dict[str, Any]]:
    """The description (:mod:`pipeline.nets.describe`) of a network, or stored in a state dict; ``None`` if none."""
    if isinstance(network_or_state, nn.Module):
        return getattr(unwrap(network_or_state), "description", None)
    return normalise_description(network_or_state.get(EXTRA_STATE), source)


def _settings_hint(target: nn.Module) -> str:
    desc = getattr(target, "description", None)
    if desc:
        return (f"this network has {describe_values(desc['settings'])}: check them against the training config, "
                "or build the network from the checkpoint (pipeline.io.checkpoints.load_network)")
    return "check the architecture settings (variant, widths, channels, ...) against the training config"


def _listed(keys: Sequence[str]) -> str:
    return f"{len(keys)}: {list(keys[:_SHOW])}" + (" ..." if len(keys) > _SHOW else "")


def _load_state(network: nn.Module, state: Mapping[str, Any], source: str, strict: bool = True) -> nn.Module:
    """Check, then load ``state`` into ``unwrap(network)``; a missing or unexpected description is not an error
    (checkpoints written before networks described themselves, networks built without a factory)."""
    target = unwrap(network)
    if isinstance(target, DescribedModule):  # another network: say so before listing its keys and shapes
        merge_descriptions(target.description, description_of(state, source), source)
    own = target.state_dict()
    shapes = [f"{k}: checkpoint {list(v.shape)} vs network {list(own[k].shape)}" for k, v in state.items()
              if isinstance(v, torch.Tensor) and isinstance(own.get(k), torch.Tensor) and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.endswith(EXTRA_STATE)]
    unexpected = [k for k in state if k not in own and not k.endswith(EXTRA_STATE)]
    problems = [f"shape mismatches {_listed(shapes)}"] if shapes else []
    if strict and missing:
        problems.append(f"missing keys {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if not any(k in own for k, v in state.items() if isinstance(v, torch.Tensor)):
        problems.append("no key of the checkpoint matches the network")
    if problems:
        raise WeightsMismatchError(f"{source} does not fit the {type(target).__name__} network: "
                                   f"{'; '.join(problems)}; {_settings_hint(target)}")
    try:
        target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except CheckpointError as e:  # raised by DescribedModule.set_extra_state: name the file
        raise type(e)(f"{source}: {e}") from None
    return network


def load_weights(network: nn.Module, path: PathLike, strict: bool = True, train: Optional[str] = None) -> nn.Module:
    """Load the checkpoint ``path`` into ``network`` (wrapped or not) and return ``network``.

    The checkpoint's description, if any, must agree with the network's (else
    :class:`~pipeline.user_errors.SettingsMismatchError`). ``strict=False`` tolerates missing and unexpected keys
    (at least one must match); shapes must always agree.
    """
    return _load_state(network, read_state_dict(path, train), str(path), strict)


def load_network(path: PathLike, fallback: Union[None, nn.Module, str, Callable[..., nn.Module]] = None,
                 train: Optional[str] = None, **settings: Any) -> nn.Module:
    """The network a checkpoint describes, with its weights loaded (the same mode as a fresh network: ``train``).

    Args:
        path: the checkpoint file.
        fallback: for a checkpoint without a description: a network to load it into, or its factory (a callable
            or a dotted path) called with the given ``settings``. Without one such a checkpoint raises
            :class:`~pipeline.user_errors.NoDescriptionError`.
        train: the command that trains such a checkpoint (quoted when the file is missing).
        settings: settings given by the user; ``None`` means "not given". Those the checkpoint records
            (architecture settings and preprocessing, e.g. ``widen_factor``, ``image_size``) must equal the
            recorded values (:class:`~pipeline.user_errors.SettingsMismatchError`, one line naming both); the
            others go to the factory (e.g. ``radiograph_only=True``).
    """
    state = read_state_dict(path, train)
    source = str(path)
    given = {k: v for k, v in settings.items() if v is not None}
    desc = description_of(state, source)
    if desc is None:
        if fallback is None:
            raise NoDescriptionError(
                f"{source}: no network description in the checkpoint (written before checkpoints recorded their "
                "network, or by other code); give the settings it was trained with")
        net = fallback if isinstance(fallback, nn.Module) else resolve_factory(fallback)(**given)
        return _load_state(net, state, source)
    check_given({**desc["preprocessing"], **desc["settings"]}, given, source)
    extra = {k: v for k, v in given.items() if k not in desc["settings"] and k not in desc["preprocessing"]}
    factory = resolve_factory(desc["factory"])
    try:
        net = factory(**desc["settings"], **extra)
    except (TypeError, ValueError) as e:
        raise SettingsMismatchError(f"{source}: cannot build {desc['factory']} with "
                                    f"{describe_values({**desc['settings'], **extra})}: {_one_line(e)}") from None
    return _load_state(net, state, source)


def network_settings(network: nn.Module, required: Sequence[str] = (), source: Optional[str] = None,
                     **given: Any) -> dict[str, Any]:
    """The settings and preprocessing ``network`` records (``{}`` without a description), merged with ``given``.

    Given values (``None`` = not given) must agree with recorded ones
    (:class:`~pipeline.user_errors.SettingsMismatchError`) and fill what the network does not record; every name
    in ``required`` must end up known (else :class:`~pipeline.user_errors.NoDescriptionError` asks for it).
    """
    desc = description_of(network) or {"settings": {}, "preprocessing": {}}
    known = {**desc["preprocessing"], **desc["settings"]}
    source = source or f"the {type(unwrap(network)).__name__} network in use"
    check_given(known, given, source)
    out = {**known, **{k: v for k, v in given.items() if v is not None and known.get(k) is None}}
    unknown = [k for k in required if out.get(k) is None]
    if unknown:
        raise NoDescriptionError(f"{source} does not record {', '.join(unknown)} (its checkpoint was written before "
                                 f"checkpoints recorded them); pass {', '.join(f'--{k}' for k in unknown)}")
    return out


def _hash_update_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def checkpoint_hash(path_or_state_dict: str | os.PathLike | Mapping[str, Any] | torch.nn.Module) -> str:
    """sha256 hex digest identifying a model checkpoint.

    * a path: sha256 of the file's bytes (streamed);
    * a state dict (or ``nn.Module``, via its ``state_dict()``): sha256 over the sorted keys with each
      tensor's dtype, shape and raw bytes (non-tensor values by ``repr``).

    The two kinds of hash differ for the same weights: use the same kind when building and loading.
    """
    h = hashlib.sha256()
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    sd = (
        path_or_state_dict.state_dict()
        if isinstance(path_or_state_dict, torch.nn.Module)
        else path_or_state_dict
    )
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a path, a state dict or an nn.Module, got {type(sd).__name__}")
    for key in sorted(sd, key=str):
        h.update(f"{key}\n".encode())
        value = sd[key]
        if isinstance(value, torch.Tensor):
            _hash_update_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()
