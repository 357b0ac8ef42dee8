"""Self-describing networks: how to rebuild a network, and what input it expects, travel in its ``state_dict``.

A network made by one of the project's factories carries a *description*::

    {"factory": "pipeline.mris.engine.make_network",                          # a @network_factory
     "settings": {"variant": "combined", "widen_factor": 0.5, "stem_stride": 2},  # factory(**settings) rebuilds it
     "preprocessing": {"image_size": 128, "roi_mm": 140.0, ...}}                  # the input the weights expect

:class:`DescribedModule` keeps it in torch's extra state (key ``_extra_state`` of the state dict), so every
checkpoint that saves ``state_dict()`` (MONAI ``CheckpointSaver``, ignite ``Checkpoint``, ``torch.save``) records
it, and loading a checkpoint into a network with another description raises
:class:`pipeline.user_errors.SettingsMismatchError` before any weight is copied.
:func:`pipeline.io.checkpoints.load_network` rebuilds a network from its checkpoint alone.

Rules:

* ``settings`` define the architecture and must be equal. A ``preprocessing`` value ``None`` means "not
  specified" (e.g. an inference network built before its checkpoint is read) and takes the checkpoint's value;
  two specified values must be equal.
* A checkpoint can only name callables of the ``pipeline`` package marked with :func:`network_factory`, so
  loading one never calls arbitrary code.
* Values are plain data (str, numbers, bools, None, lists, dicts), read back by ``torch.load(weights_only=True)``.

Only this module imports nothing heavier than torch (the KNEEL network uses it without MONAI).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

from torch import nn

from pipeline.user_errors import CheckpointError, SettingsMismatchError

__all__ = [
    "DescribedModule", "FACTORY_ALIASES", "LEGACY_FORMATS", "check_given", "describe_values", "factory_path", "make_description",
    "merge_descriptions", "network_factory", "normalise_description", "plain", "resolve_factory",
]

#: Only factories inside this package can be named by a checkpoint.
FACTORY_PACKAGE = "pipeline."
#: Description formats written before the common shape -> the function (dotted path) that converts them.
LEGACY_FORMATS = {"kneel-hourglass-v1": "pipeline.landmarks.network.upgrade_description"}
#: Factory paths of checkpoints written before a factory moved -> its current path (old checkpoints stay
#: loadable; add a line here whenever a ``@network_factory`` moves). No factory has moved yet.
FACTORY_ALIASES: dict[str, str] = {}

Factory = Union[str, Callable[..., nn.Module]]


def network_factory(fn: Callable) -> Callable:
    """Mark ``fn`` (a function or a class) as a factory a checkpoint description may name."""
    fn.__network_factory__ = True
    return fn


def factory_path(factory: Factory) -> str:
    """``"module.qualname"`` of a factory (a dotted path is returned unchanged)."""
    return factory if isinstance(factory, str) else f"{factory.__module__}.{factory.__qualname__}"


def _import_path(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def resolve_factory(path: Factory) -> Callable[..., nn.Module]:
    """The factory named by ``path``; refuses anything outside :data:`FACTORY_PACKAGE` or not marked with
    :func:`network_factory` (:class:`pipeline.user_errors.CheckpointError`)."""
    if callable(path):
        return path
    path = FACTORY_ALIASES.get(path, path) if isinstance(path, str) else path
    fn = None
    if isinstance(path, str) and path.startswith(FACTORY_PACKAGE):
        try:
            fn = _import_path(path)
        except (ImportError, AttributeError, ValueError):
            fn = None
    if not getattr(fn, "__network_factory__", False):
        raise CheckpointError(f"network factory {path!r} is not a known network factory of this package "
                              "(pipeline.* marked with @network_factory)")
    return fn


def plain(value: Any) -> Any:
    """``value`` as plain data: tuples -> lists, numpy / torch scalars -> Python numbers, other objects -> str."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)


def make_description(factory: Factory, settings: Mapping[str, Any],
                     preprocessing: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """``{"factory", "settings", "preprocessing"}`` (module docstring); ``factory(**settings)`` must rebuild it."""
    return {"factory": factory_path(factory), "settings": plain(dict(settings)),
            "preprocessing": plain(dict(preprocessing or {}))}


def normalise_description(state: Any, source: str = "the checkpoint") -> Optional[dict[str, Any]]:
    """A stored extra state -> a description of the common shape (legacy formats converted), ``None`` for none.

    Raises :class:`pipeline.user_errors.CheckpointError` (naming ``source``) for anything else."""
    if state is None:
        return None
    if isinstance(state, Mapping) and state.get("format") in LEGACY_FORMATS:
        state = _import_path(LEGACY_FORMATS[state["format"]])(state)
    if (isinstance(state, Mapping) and isinstance(state.get("factory"), str)
            and isinstance(state.get("settings", {}), Mapping) and isinstance(state.get("preprocessing", {}), Mapping)):
        factory = FACTORY_ALIASES.get(state["factory"], state["factory"])
        return make_description(factory, state.get("settings", {}), state.get("preprocessing", {}))
    raise CheckpointError(f"{source}: its extra state {str(state)[:120]!r} is not a network description")


def describe_values(values: Mapping[str, Any]) -> str:
    """``"a=1, b='x'"`` for messages."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def check_given(known: Mapping[str, Any], given: Mapping[str, Any], source: str) -> None:
    """Raise :class:`pipeline.user_errors.SettingsMismatchError` (one line naming both values) where a given
    (non-None) value contradicts a known (non-None) one."""
    clash = {k: v for k, v in given.items()
             if v is not None and known.get(k) is not None and plain(v) != known[k]}
    if clash:
        raise SettingsMismatchError(
            f"{source} has {describe_values({k: known[k] for k in clash})}, but {describe_values(clash)} was given; "
            "leave these settings unset (they are read from the checkpoint) or use a checkpoint trained with them")


def merge_descriptions(mine: Optional[dict], theirs: Optional[dict], source: str = "the checkpoint"
                       ) -> Optional[dict]:
    """The description of a network with description ``mine`` after loading a checkpoint described by
    ``theirs``: the checkpoint's preprocessing fills the values ``mine`` leaves unspecified. Raises
    :class:`pipeline.user_errors.SettingsMismatchError` when the two describe different networks."""
    if theirs is None or mine is None:
        return copy.deepcopy(mine if theirs is None else theirs)
    if mine["factory"] != theirs["factory"]:
        ours, other = {"factory": mine["factory"]}, {"factory": theirs["factory"]}
    else:
        keys = [k for k in {**theirs["settings"], **mine["settings"]}
                if theirs["settings"].get(k, "<unset>") != mine["settings"].get(k, "<unset>")]
        ours = {k: mine["settings"].get(k) for k in keys}
        other = {k: theirs["settings"].get(k) for k in keys}
    prep = dict(theirs["preprocessing"])
    for k, v in mine["preprocessing"].items():
        if v is None:
            continue
        if prep.get(k) is not None and prep[k] != v:
            ours[k], other[k] = v, prep[k]
        prep[k] = v
    if ours:
        raise SettingsMismatchError(
            f"{source} holds a network with {describe_values(other)}, but it is loaded into one with "
            f"{describe_values(ours)}; build the network from the checkpoint (pipeline.io.checkpoints.load_network) "
            "or give the settings it was trained with")
    return {"factory": mine["factory"], "settings": copy.deepcopy(mine["settings"]), "preprocessing": prep}


class DescribedModule(nn.Module):
    """Mixin of a network that carries its description (module docstring) in its state dict.

    ``self.description`` is ``None`` until :meth:`describe` (the factories call it) or until a described
    checkpoint is loaded. ``get_extra_state`` / ``set_extra_state`` are torch's hooks: the description is saved
    with every ``state_dict()`` and checked (then completed) by every ``load_state_dict``.
    """

    description = None  # no annotation: TorchScript (ckpt_export) leaves un-annotated, unused attributes alone

    def describe(self, factory: Factory, settings: Mapping[str, Any],
                 preprocessing: Optional[Mapping[str, Any]] = None) -> DescribedModule:
        """Record how this network is rebuilt (``factory(**settings)``) and the input it expects; returns self."""
        self.description = make_description(factory, settings, preprocessing)
        return self

    def get_extra_state(self) -> Any:
        return copy.deepcopy(self.description)

    def set_extra_state(self, state: Any) -> None:
        self.description = merge_descriptions(self.description, normalise_description(state))
