"""Generic ignite handlers for training configs: checkpoints that carry the engine, per-epoch sampler state.

* :class:`EngineCheckpointSaver` / :class:`EngineCheckpointLoader`: MONAI's checkpoint handlers that also
  save / restore the engine they are attached to, so a resumed run continues at its epoch and iteration.
* :class:`SamplerEpochHandler`: ``sampler.set_epoch`` at every epoch (e.g.
  :class:`pipeline.sampling.SubjectVisitSampler`).
"""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["EngineCheckpointLoader", "EngineCheckpointSaver", "SamplerEpochHandler"]


class SamplerEpochHandler:
    """Call ``sampler.set_epoch(epoch - 1)`` at every ``EPOCH_STARTED`` (ignite epochs are 1-based), so
    :class:`pipeline.sampling.SubjectVisitSampler` draws another visit per subject each epoch."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(engine.state.epoch - 1)


class EngineCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` that also saves the engine it is attached to (under
    ``engine_key``, default ``"trainer"``), so a config needs no circular ``@train#trainer`` reference.
    The final checkpoint then restores epoch/iteration on resume (:class:`EngineCheckpointLoader`)."""

    def __init__(self, *args: Any, engine_key: str = "trainer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.save_dict[self.engine_key] = engine
        super().attach(engine)


class EngineCheckpointLoader(CheckpointLoader):
    """:class:`monai.handlers.CheckpointLoader` that also restores the engine it is attached to
    (``engine_key``, default ``"trainer"``) when the checkpoint holds it."""

    def __init__(self, *args: Any, engine_key: str = "trainer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        self.load_dict[self.engine_key] = engine
        super().attach(engine)
