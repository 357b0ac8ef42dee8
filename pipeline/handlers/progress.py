"""A tqdm progress bar over a whole ignite / MONAI engine run (MONAI handler style: ``attach(engine)``).

One bar per ``engine.run()``: ``total`` = every iteration of the run (``max_epochs x epoch_length`` for a
fresh trainer; a resumed trainer starts the bar at ``state.iteration``; a MONAI evaluator, which
``ValidationHandler`` runs with the trainer's epoch, gets one epoch's iterations), with the elapsed time,
the rate and the time estimate of tqdm, and a postfix ``epoch e/E`` and the latest loss.

When the bar's stream is not a terminal (log files, CI) it redraws at most every ``non_tty_interval_s``
seconds (tqdm ``mininterval``), so logs are not flooded. No ``Events.EXCEPTION_RAISED`` handler is
registered (in ignite such a handler swallows the exception); a bar left open by an exception is closed
by the next run or by garbage collection.

Config use (appended to ``train#handlers``)::

    {"_target_": "pipeline.handlers.ProgressBar", "desc": "train"}
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any, Callable

import torch
from ignite.engine import Engine, Events
from tqdm.auto import tqdm

__all__ = ["ProgressBar", "loss_from_output"]


def loss_from_output(output: Any) -> float | None:
    """``output["loss"]`` as a float, like ``monai.handlers.from_engine(["loss"], first=True)``: a dict
    output (``decollate=False``) or the first item of a decollated list; None when there is no loss."""
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)) and len(output) > 0:
        output = output[0]
    if not isinstance(output, Mapping) or "loss" not in output:
        return None
    loss = output["loss"]
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            return None
        return float(loss.detach().item())
    try:
        return float(loss)
    except (TypeError, ValueError):
        return None


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class ProgressBar:
    """tqdm bar over the whole run of the engine it is attached to.

    Args:
        desc: bar label; default: the engine's class name (``SupervisedTrainer``, ``SupervisedEvaluator``).
        output_transform: ``engine.state.output`` -> loss (float, 0-d tensor or None) shown in the postfix;
            default :func:`loss_from_output` (``output["loss"]`` when present). None: no loss.
        leave: keep the finished bar on screen (tqdm ``leave``); ``False`` suits nested evaluator bars.
        disable: attach nothing (e.g. ``"$not @progress_bar"`` in a config).
        mininterval: seconds between redraws on a terminal (tqdm default 0.1).
        non_tty_interval_s: seconds between redraws when the stream is not a terminal (default 30).
        file: output stream (default ``sys.stderr``).
        unit: tqdm unit (default ``"it"``).
    """

    def __init__(self, desc: str | None = None,
                 output_transform: Callable[[Any], Any] | None = loss_from_output, leave: bool = True,
                 disable: bool = False, mininterval: float = 0.1, non_tty_interval_s: float = 30.0,
                 file: IO[str] | None = None, unit: str = "it") -> None:
        self.desc = desc
        self.output_transform = output_transform
        self.leave = bool(leave)
        self.disable = bool(disable)
        self.mininterval = float(mininterval)
        self.non_tty_interval_s = float(non_tty_interval_s)
        self.file = file
        self.unit = unit
        self.bar: tqdm | None = None
        #: ``(initial, total, n)`` of every closed bar (the last run last), for checks and tests.
        self.history: list[tuple[int, int | None, int]] = []

    # ------------------------------------------------------------------------------------------ attach
    def attach(self, engine: Engine) -> None:
        """Register STARTED (open), ITERATION_COMPLETED (advance), EPOCH_COMPLETED (postfix) and
        COMPLETED / TERMINATE (close) handlers; nothing when ``disable``."""
        if self.disable:
            return
        if engine.has_event_handler(self._start, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.close)
        engine.add_event_handler(Events.TERMINATE, self.close)

    # ------------------------------------------------------------------------------------------ events
    @staticmethod
    def run_span(engine: Engine) -> tuple[int, int | None]:
        """``(initial, total)`` of the run that starts now, in iterations.

        ``initial`` = ``state.iteration`` and ``total`` = ``max_epochs x epoch_length`` (ignite's iteration
        counter is global over epochs, so a resumed trainer continues its bar). A MONAI evaluator restarts
        ``iteration`` at 0 but sets ``epoch`` to the trainer's epoch - 1; the whole epochs that ``epoch``
        is ahead of ``iteration`` are taken off ``total`` (one epoch's bar per validation).
        ``total`` is None when the epoch length is unknown.
        """
        st = engine.state
        initial = int(st.iteration or 0)
        if not st.epoch_length or st.max_epochs is None:
            return initial, None
        length = int(st.epoch_length)
        skipped_epochs = max(0, (int(st.epoch or 0) * length - initial) // length)
        return initial, (int(st.max_epochs) - skipped_epochs) * length

    def _start(self, engine: Engine) -> None:
        self.close()
        initial, total = self.run_span(engine)
        stream = self.file if self.file is not None else sys.stderr
        interval = self.mininterval if _is_tty(stream) else max(self.mininterval, self.non_tty_interval_s)
        self.bar = tqdm(total=total, initial=initial, desc=self.desc or type(engine).__name__, leave=self.leave,
                        file=stream, mininterval=interval, unit=self.unit, dynamic_ncols=True)
        self._set_postfix(engine, refresh=False)

    def _postfix(self, engine: Engine) -> str:
        st = engine.state
        parts = [f"epoch {st.epoch}/{st.max_epochs}"]
        if self.output_transform is not None and st.output is not None:
            try:
                loss = self.output_transform(st.output)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                loss = None
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = float(loss.detach().item())
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                parts.append(f"loss {loss:.4g}")
            elif isinstance(loss, float):
                parts.append(f"loss {loss}")
        return ", ".join(parts)

    def _set_postfix(self, engine: Engine, refresh: bool) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(engine), refresh=refresh)

    def _update(self, engine: Engine) -> None:
        bar = self.bar
        if bar is None:
            return
        # compute the postfix (may sync a GPU for the loss) only when tqdm is about to redraw
        if time.time() - bar.last_print_t >= bar.mininterval:
            self._set_postfix(engine, refresh=False)
        bar.update(1)

    def _epoch_completed(self, engine: Engine) -> None:
        self._set_postfix(engine, refresh=False)

    def close(self, engine: Engine | None = None) -> None:
        """Close the bar (idempotent); the final state (count, time, postfix) is drawn once."""
        if self.bar is not None:
            if engine is not None:
                self._set_postfix(engine, refresh=False)
            self.history.append((int(self.bar.initial), self.bar.total, int(self.bar.n)))
            self.bar.close()
            self.bar = None
