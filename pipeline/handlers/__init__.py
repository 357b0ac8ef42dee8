"""Generic ignite / MONAI engine handlers shared by every bundle.

* :class:`ProgressBar`: one tqdm bar (time estimate, epoch, latest loss) over a whole training or
  evaluation run; sparse redraws when the output is not a terminal.
* :class:`TensorBoardExamples`: a few rendered validation examples per validation run as a TensorBoard
  image (render functions: ``pipeline.<method>.tb_examples.render_examples``).
* :class:`EngineCheckpointSaver` / :class:`EngineCheckpointLoader`: checkpoints that also save / restore the
  trainer (resume at its epoch); :class:`SamplerEpochHandler`: ``sampler.set_epoch`` every epoch
  (:mod:`pipeline.handlers.engine_state`).
* :mod:`pipeline.handlers.panels`: the matplotlib panel grids those render functions draw.
"""

from pipeline.handlers.engine_state import EngineCheckpointLoader, EngineCheckpointSaver, SamplerEpochHandler
from pipeline.handlers.progress import ProgressBar, loss_from_output
from pipeline.handlers.tensorboard_examples import TensorBoardExamples

__all__ = ["EngineCheckpointLoader", "EngineCheckpointSaver", "ProgressBar", "SamplerEpochHandler",
           "TensorBoardExamples", "loss_from_output"]
