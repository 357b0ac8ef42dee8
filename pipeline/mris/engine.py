"""MONAI-engine pieces of MRIS training: network factory, iteration functions, recall metric.

Used by ``bundles/mris/configs/train.json``:

* :func:`make_network` -> :class:`pipeline.mris.network.DualEncoder` (MRIS-C) or :class:`pipeline.mris.network.MRISSeparate`,
  self-describing; :func:`load_mris_network` rebuilds one from its checkpoint, :func:`run_settings` reads the
  variant and image size a network was trained with.
* :class:`MRISTrainStep` -> ``SupervisedTrainer(iteration_update=...)``: both encoders' embeddings, the
  longitudinal triplet loss with same-subject pairs masked, gradient-norm clipping per encoder.
* :class:`MRISEvalStep` -> ``SupervisedEvaluator(iteration_update=...)``: embeddings of radiographs and maps.
* :class:`RetrievalRecall` (ignite ``Metric``): recall@k of radiograph -> map retrieval over the whole
  validation set (first visit per knee); ``k=None`` gives the model-selection key R@1 + R@5 + R@10.

Batch layout: ``image`` ``B x 1 x S x S``; MRIS-C ``maps`` ``B x 1 x 2S x S``; MRIS-S ``fc``/``tc``
``B x 1 x S x S``; ``subject_id`` list of ``B`` str. Embeddings ``B x D``, unit L2 norm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.utils import CommonKeys

from pipeline.conventions import MAP_KEYS
from pipeline.io.checkpoints import load_network, network_settings, unwrap
from pipeline.mris.data import check_variant, network_keys, radiograph_preprocessing
from pipeline.mris.metrics import recall_at_k
from pipeline.mris.network import DualEncoder, MRISSeparate, RadiographDualEncoder, RadiographMRISSeparate
from pipeline.nets.describe import network_factory

Embeddings = torch.Tensor | dict[str, torch.Tensor]


#: Settings of an MRIS network when neither the user nor a checkpoint gives them (the paper's).
DEFAULTS = {"variant": "combined", "widen_factor": 1.0, "stem_stride": 2}
#: The command that trains an MRIS checkpoint (quoted when one is missing).
TRAIN_COMMAND = "python -m monai.bundle run training --config_file bundles/mris/configs/train.json"
#: The map encoder's input, as the checkpoint records it.
MAP_INPUT = "thickness maps: mm / 3, NaN -> 0, resized to image_size (MRIS-C: FC above TC, 2 image_size x image_size)"


@network_factory
def make_network(variant: str | None = "combined", widen_factor: float | None = 1.0, stem_stride: int | None = 2,
                 radiograph_only: bool = False, image_size: int | None = None) -> torch.nn.Module:
    """MRIS-C (``"combined"``): one :class:`DualEncoder` on stacked FC/TC maps; MRIS-S (``"separate"``):
    :class:`MRISSeparate` with one pair per map. ``widen_factor`` < 1 only for tests and demos; ``None`` for any
    setting means the default (:data:`DEFAULTS`).

    The network describes itself (:mod:`pipeline.nets.describe`): ``variant``, ``widen_factor``, ``stem_stride``
    as settings, and as preprocessing the radiograph chain at ``image_size``
    (:func:`pipeline.mris.data.radiograph_preprocessing`: 140 mm ROI, percentile normalisation; ``None`` = taken
    from the checkpoint loaded into it). Its checkpoints therefore rebuild it (:func:`load_mris_network`).

    ``radiograph_only=True`` (inference, ``verify_net_in_out``, ``ckpt_export``): the same model with the
    same state-dict keys and description (training checkpoints load strictly; ``embed_xray`` / ``embed_map``
    unchanged) but ``forward(x)`` = the radiograph embedding only: ``B x D`` for MRIS-C
    (:class:`~pipeline.mris.network.RadiographDualEncoder`), the FC and TC radiograph embeddings concatenated,
    ``B x 2D``, for MRIS-S (:class:`~pipeline.mris.network.RadiographMRISSeparate`)."""
    given = {"variant": variant, "widen_factor": widen_factor, "stem_stride": stem_stride}
    s = {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
    settings = {"variant": check_variant(s["variant"]), "widen_factor": float(s["widen_factor"]),
                "stem_stride": int(s["stem_stride"])}
    kw = {"widen_factor": settings["widen_factor"], "stem_stride": settings["stem_stride"]}
    if settings["variant"] == "combined":
        net = RadiographDualEncoder(**kw) if radiograph_only else DualEncoder(**kw)
    else:
        net = RadiographMRISSeparate(MAP_KEYS, **kw) if radiograph_only else MRISSeparate(MAP_KEYS, **kw)
    return net.describe(make_network, settings, {**radiograph_preprocessing(image_size), "maps": MAP_INPUT})


def load_mris_network(checkpoint: str | Path, radiograph_only: bool = False, variant: str | None = None,
                      image_size: int | None = None, widen_factor: float | None = None,
                      stem_stride: int | None = None) -> torch.nn.Module:
    """The MRIS network of ``checkpoint`` with its weights: built from the checkpoint's own record; settings given
    here (``None`` = not given) must agree with it. A checkpoint written before networks described themselves is
    loaded into :func:`make_network` built from the given settings (defaults for the others)."""
    return load_network(checkpoint, fallback=make_network, train=TRAIN_COMMAND, radiograph_only=radiograph_only,
                        variant=None if variant is None else check_variant(variant), image_size=image_size,
                        widen_factor=widen_factor, stem_stride=stem_stride)


def run_settings(network: torch.nn.Module, variant: str | None = None, image_size: int | None = None
                 ) -> tuple[str, int]:
    """``(variant, image_size)`` to run ``network`` with: its own record, checked against those given
    (``None`` = not given; needed only for networks whose checkpoint does not record them)."""
    s = network_settings(network, required=("variant", "image_size"),
                         variant=None if variant is None else check_variant(variant), image_size=image_size)
    return check_variant(s["variant"]), int(s["image_size"])


def _maps_from_batch(batch: Mapping[str, Any], variant: str, device: torch.device | str | None):
    keys = network_keys(variant)
    if check_variant(variant) == "combined":
        return batch[keys[0]].to(device, non_blocking=True)
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


def embed_pair(network: torch.nn.Module, image: torch.Tensor, maps: torch.Tensor | Mapping[str, torch.Tensor]
               ) -> tuple[Embeddings, Embeddings]:
    """``(f(image), g(maps))``; MRIS-S returns ``({key: B x D}, {key: B x D})``."""
    out = network(image, maps)
    if isinstance(out, Mapping):
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}
    return out


class MRISTrainStep:
    """``SupervisedTrainer`` iteration: embeddings, triplet loss (sum over map keys for MRIS-S),
    backward, gradient-norm clip per encoder (``max_grad_norm``; None = off), optimiser step.

    Returns ``{"image", "loss", "xray_emb", "map_emb"}`` (loss detached; embeddings detached).
    """

    def __init__(self, variant: str = "combined", max_grad_norm: float | None = 1.0) -> None:
        self.variant = check_variant(variant)
        self.max_grad_norm = max_grad_norm

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        image = batch[CommonKeys.IMAGE].to(device, non_blocking=True)
        maps = _maps_from_batch(batch, self.variant, device)
        groups = list(batch["subject_id"])
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        fx, gy = embed_pair(engine.network, image, maps)
        if isinstance(fx, Mapping):
            loss = sum(engine.loss_function(fx[k], gy[k], groups) for k in fx)
        else:
            loss = engine.loss_function(fx, gy, groups)
        loss.backward()
        if self.max_grad_norm is not None:
            for enc in unwrap(engine.network).encoders().values():
                torch.nn.utils.clip_grad_norm_(enc.parameters(), self.max_grad_norm)
        engine.optimizer.step()
        detach = (lambda e: {k: v.detach() for k, v in e.items()}) if isinstance(fx, Mapping) else torch.Tensor.detach
        return {CommonKeys.IMAGE: image, CommonKeys.LOSS: loss.detach(), "xray_emb": detach(fx), "map_emb": detach(gy)}


class MRISEvalStep:
    """``SupervisedEvaluator`` iteration: ``{"xray_emb", "map_emb", "knee_id"}`` under ``no_grad``."""

    def __init__(self, variant: str = "combined") -> None:
        self.variant = check_variant(variant)

    def __call__(self, engine: Engine, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        image = batch[CommonKeys.IMAGE].to(device, non_blocking=True)
        maps = _maps_from_batch(batch, self.variant, device)
        engine.network.eval()
        with torch.no_grad():
            fx, gy = embed_pair(engine.network, image, maps)
        return {"xray_emb": fx, "map_emb": gy, "knee_id": list(batch.get("knee_id", []))}


def similarity_matrix(xray_emb: Embeddings, map_emb: Embeddings) -> torch.Tensor:
    """Cosine similarity ``Q x N`` of unit embeddings; MRIS-S: the mean over map keys."""
    if isinstance(xray_emb, Mapping):
        return torch.stack([xray_emb[k] @ map_emb[k].T for k in xray_emb]).mean(0)
    return xray_emb @ map_emb.T


class RetrievalRecall(Metric):
    """Radiograph -> map retrieval recall (percent) over the whole evaluation set.

    Item ``i``'s radiograph should retrieve item ``i``'s map among all maps of the set (ties pessimistic,
    :func:`pipeline.mris.metrics.recall_at_k`). ``k``: one k (returns R@k) or None (returns R@1 + R@5 + R@10,
    the MRIS model-selection key). Reads ``output["xray_emb"]`` / ``output["map_emb"]``.
    """

    required_output_keys = ("xray_emb", "map_emb")

    def __init__(self, k: int | None = None, ks: Sequence[int] = (1, 5, 10), output_transform=lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        self.k, self.ks = k, tuple(ks)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._x: list[Embeddings] = []
        self._y: list[Embeddings] = []

    def update(self, output: Sequence[Embeddings]) -> None:
        """``output`` = ``(xray_emb, map_emb)`` (ignite picks :attr:`required_output_keys`)."""
        xray_emb, map_emb = output
        cpu = (lambda e: {k: v.detach().float().cpu() for k, v in e.items()}) if isinstance(
            xray_emb, Mapping) else (lambda e: e.detach().float().cpu())
        self._x.append(cpu(xray_emb))
        self._y.append(cpu(map_emb))

    @staticmethod
    def _cat(parts: list[Embeddings]) -> Embeddings:
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return torch.cat(parts)

    def compute(self) -> float:
        if not self._x:
            raise RuntimeError("RetrievalRecall needs at least one batch")
        sim = similarity_matrix(self._cat(self._x), self._cat(self._y)).numpy()
        ks = (self.k,) if self.k is not None else self.ks
        rec = recall_at_k(sim, ks=ks)
        return float(sum(rec.values()))
