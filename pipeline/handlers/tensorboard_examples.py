"""TensorBoard images of a few validation examples per validation run (MONAI handler style).

:class:`TensorBoardExamples` is attached to an evaluator. During each run it keeps the batch and the
output of the first iteration(s), detached and on the CPU, up to ``keep`` items (default ``n``); at
``EPOCH_COMPLETED`` it calls ``render(batch, output, n)`` -> ``np.ndarray (H, W, 3) uint8`` and writes it
with ``SummaryWriter.add_image(tag, img, global_step, dataformats="HWC")``. The global step is the
evaluator's ``state.epoch``: MONAI's ``ValidationHandler`` runs the evaluator with the trainer's epoch, so
it is the trainer's epoch.

Kept data: tensors are sliced to their first items along dim 0 (collated batches, ``decollate=False``),
lists to their first elements (collated strings, or the per-item dicts of a decollated batch), mappings
key by key. When the first batch has fewer than ``keep`` items, later batches are appended until there
are ``keep`` (as long as their shapes fit). ``batch_transform`` / ``output_transform`` reduce the data
BEFORE it is kept (e.g. one slice of a 3D volume).

Render functions of the methods: :func:`pipeline.mris.tb_examples.render_examples`,
:func:`pipeline.landmarks.tb_examples.render_examples`, :func:`pipeline.segmentation.tb_examples.render_examples`,
:func:`pipeline.baselines.tb_examples.render_examples` (matplotlib grids built with
:func:`pipeline.handlers.panels.render_panels`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
import torch
from ignite.engine import Engine, Events

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardExamples", "take_items", "merge_items", "count_items", "resolve_callable"]

logger = logging.getLogger(__name__)

RenderFn = Callable[[Any, Any, int], np.ndarray]


def resolve_callable(obj: Union[str, Callable]) -> Callable:
    """``obj`` itself, or the object a dotted path ``"package.module.name"`` names."""
    if callable(obj):
        return obj
    if not isinstance(obj, str) or "." not in obj:
        raise TypeError(f"expected a callable or a dotted path 'module.name', got {obj!r}")
    module, _, name = obj.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _cpu(x: Any) -> Any:
    """Detached CPU copy of every tensor in ``x`` (MetaTensors become plain tensors); other values as is."""
    if isinstance(x, torch.Tensor):
        t = x.as_tensor() if hasattr(x, "as_tensor") else x
        return t.detach().cpu()
    if isinstance(x, Mapping):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu(v) for v in x)
    return x


def take_items(data: Any, n: int) -> Any:
    """The first ``n`` items of a batch or output: tensors sliced on dim 0 (0-d kept), lists / tuples cut
    to ``n`` elements (each element copied whole), mappings key by key; all tensors detached, on CPU."""
    if isinstance(data, torch.Tensor):
        return _cpu(data if data.ndim == 0 else data[:n])
    if isinstance(data, Mapping):
        return {k: take_items(v, n) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_cpu(v) for v in data[:n]]
    return data


def count_items(data: Any) -> int | None:
    """Number of items of a batch / output (first tensor's dim 0, a list's length); None if unknown."""
    if isinstance(data, torch.Tensor):
        return None if data.ndim == 0 else int(data.shape[0])
    if isinstance(data, (list, tuple)):
        return len(data)
    if isinstance(data, Mapping):
        for v in data.values():
            c = count_items(v)
            if c is not None:
                return c
    return None


def merge_items(a: Any, b: Any) -> Any:
    """``a`` followed by ``b`` (as kept by :func:`take_items`); raises ``ValueError`` when they do not fit.
    Values that are not per item (not a tensor with a batch dimension, a list or a mapping) keep ``a``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.ndim == 0 and b.ndim == 0:
            return a
        if a.ndim == 0 or b.ndim == 0 or a.shape[1:] != b.shape[1:]:
            raise ValueError("tensor shapes differ")
        return torch.cat([a, b.to(a.dtype)])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError("keys differ")
        return {k: merge_items(a[k], b[k]) for k in a}
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    containers = (torch.Tensor, Mapping, list)
    if isinstance(a, containers) or isinstance(b, containers):
        raise ValueError(f"cannot merge {type(a).__name__} and {type(b).__name__}")
    return a  # a value that is not per item (None, a number, a string): the first one is kept


class TensorBoardExamples:
    """Render ``n`` examples of each evaluator run into one TensorBoard image.

    Args:
        render: ``render(batch, output, n) -> (H, W, 3) uint8`` (or a dotted path to it, e.g.
            ``"pipeline.mris.tb_examples.render_examples"``). ``batch`` / ``output`` are the kept data
            (see module docstring) with up to ``keep`` items.
        n: examples per image; ``n <= 0`` attaches nothing.
        keep: items kept for ``render`` (default ``n``; MRIS keeps a whole batch to synthesize maps by k-NN
            from the other items).
        tag: TensorBoard image tag.
        log_dir: directory of the ``SummaryWriter`` created on the first write (when no ``summary_writer``).
        summary_writer: an existing ``SummaryWriter`` (not closed by this handler).
        batch_transform, output_transform: applied to ``engine.state.batch`` / ``engine.state.output`` of
            each kept iteration before it is stored (default: as is); callables or dotted paths.
        global_step_transform: engine -> step (default ``engine.state.epoch``).
        strict: re-raise render errors (default: log them with the traceback and skip this image, so a
            plotting problem never stops a training run).
        render_kwargs: extra keyword arguments of ``render`` (e.g. ``{"mm_per_unit": 135.0}`` for KNEEL).
    """

    def __init__(self, render: Union[str, RenderFn], n: int = 4, keep: int | None = None, tag: str = "val_examples",
                 log_dir: str = "./runs", summary_writer: SummaryWriter | None = None,
                 batch_transform: Union[str, Callable[[Any], Any]] = lambda x: x,
                 output_transform: Union[str, Callable[[Any], Any]] = lambda x: x,
                 global_step_transform: Callable[[Engine], int] | None = None, strict: bool = False,
                 render_kwargs: Mapping[str, Any] | None = None) -> None:
        self.render = resolve_callable(render)
        self.render_kwargs = dict(render_kwargs or {})
        self.n = int(n)
        self.keep = max(self.n, int(keep)) if keep is not None else self.n
        self.tag = tag
        self.log_dir = log_dir
        self._writer = summary_writer
        self._internal_writer = summary_writer is None
        self.batch_transform = resolve_callable(batch_transform)
        self.output_transform = resolve_callable(output_transform)
        self.global_step_transform = global_step_transform
        self.strict = bool(strict)
        self._reset()

    # ------------------------------------------------------------------------------------------ attach
    def attach(self, engine: Engine) -> None:
        """STARTED: forget the last run; ITERATION_COMPLETED: keep items; EPOCH_COMPLETED: render + write."""
        if self.n <= 0 or engine.has_event_handler(self._collect, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self._on_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    @property
    def summary_writer(self) -> SummaryWriter:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def close(self) -> None:
        """Close the writer this handler created (an external ``summary_writer`` stays open)."""
        if self._internal_writer and self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------------ events
    def _reset(self) -> None:
        self.batch: Any = None
        self.output: Any = None
        self._count = 0
        self._full = False

    def _on_started(self, engine: Engine) -> None:
        self._reset()

    def _collect(self, engine: Engine) -> None:
        if self._full:
            return
        want = self.keep - self._count
        batch = take_items(self.batch_transform(engine.state.batch), want)
        output = take_items(self.output_transform(engine.state.output), want)
        got = count_items(output)
        if got is None:
            got = count_items(batch)
        if got is None:  # unknown layout: keep this iteration only
            self.batch, self.output, self._count, self._full = batch, output, self.keep, True
            return
        if self._count == 0:
            self.batch, self.output = batch, output
        else:
            try:
                self.batch, self.output = merge_items(self.batch, batch), merge_items(self.output, output)
            except ValueError:  # shapes differ from the first batch: render what we have
                self._full = True
                return
        self._count += got
        self._full = self._count >= self.keep

    def _write(self, engine: Engine) -> None:
        if self._count == 0 and self.output is None and self.batch is None:
            return
        step = self.global_step_transform(engine) if self.global_step_transform else int(engine.state.epoch)
        try:
            img = np.asarray(self.render(self.batch, self.output, self.n, **self.render_kwargs))
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"render must return an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
            self.summary_writer.add_image(self.tag, img, global_step=step, dataformats="HWC")
            self.summary_writer.flush()
        except Exception:
            if self.strict:
                raise
            logger.exception("TensorBoardExamples: could not render / write %r at step %s", self.tag, step)
        finally:
            self._reset()
