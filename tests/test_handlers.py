"""Engine handlers of ``pipeline.handlers`` (progress bar, TensorBoard examples) and the four render
functions of the bundles' TensorBoard example images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from pipeline.handlers import ProgressBar, TensorBoardExamples
from pipeline.handlers.tensorboard_examples import merge_items, take_items

DATA = [0.0, 1.0, 2.0, 3.0]  # 4 items per epoch
EPOCHS = 3


def _engine() -> Engine:
    return Engine(lambda engine, batch: {"loss": torch.tensor(batch * 0.5)})


class _TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------- progress bar
def test_progress_bar_counts_the_whole_run_and_shows_epoch_and_loss():
    stream = io.StringIO()
    bar = ProgressBar(desc="train", file=stream)
    engine = _engine()
    bar.attach(engine)
    bar.attach(engine)  # attaching twice registers nothing new
    seen = {}

    @engine.on(Events.ITERATION_COMPLETED(once=1))
    def _spy(e):
        seen["total"], seen["mininterval"] = bar.bar.total, bar.bar.mininterval

    engine.run(DATA, max_epochs=EPOCHS)
    assert bar.history == [(0, EPOCHS * len(DATA), EPOCHS * len(DATA))]
    assert bar.bar is None  # closed on COMPLETED
    assert seen == {"total": 12, "mininterval": 30.0}  # not a terminal: at most one redraw per 30 s
    text = stream.getvalue()
    assert "12/12" in text and "epoch 3/3" in text and "loss 1.5" in text
    assert text.count("\r") <= 3  # start + final (+ tqdm's close), not one line per iteration
    assert not engine.has_event_handler(bar._start, Events.EXCEPTION_RAISED)
    assert len(engine._event_handlers[Events.EXCEPTION_RAISED]) == 0


def test_progress_bar_restarts_and_resumes():
    bar = ProgressBar(file=io.StringIO())
    engine = _engine()
    bar.attach(engine)
    engine.run(DATA, max_epochs=EPOCHS)
    engine.run(DATA, max_epochs=EPOCHS)  # a finished engine starts again from 0
    assert bar.history[1] == (0, 12, 12)

    # terminated after epoch 1 (TERMINATE closes the bar), then resumed: the bar starts at iteration 4
    bar2 = ProgressBar(file=io.StringIO())
    engine2 = _engine()
    engine2.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    bar2.attach(engine2)
    engine2.run(DATA, max_epochs=EPOCHS)
    assert bar2.history == [(0, 12, 4)] and bar2.bar is None
    engine2.run(DATA, max_epochs=EPOCHS)
    assert bar2.history[-1] == (4, 12, 12)


def test_progress_bar_terminal_interval_disable_and_exceptions_propagate():
    bar = ProgressBar(file=_TTYStream())
    engine = _engine()
    bar.attach(engine)
    intervals = []
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: intervals.append(bar.bar.mininterval))
    engine.run(DATA, max_epochs=1)
    assert intervals == [0.1]

    off = ProgressBar(disable=True)
    engine = _engine()
    off.attach(engine)
    engine.run(DATA, max_epochs=1)
    assert off.history == [] and not engine.has_event_handler(off._start)

    def boom(engine, batch):
        raise RuntimeError("boom")

    failing = Engine(boom)
    ProgressBar(file=io.StringIO()).attach(failing)
    with pytest.raises(RuntimeError, match="boom"):
        failing.run(DATA, max_epochs=1)


def test_progress_bar_on_a_monai_evaluator_is_one_epoch_per_validation():
    from monai.engines import SupervisedEvaluator

    data = [{"image": torch.zeros(1, 2), "label": torch.zeros(1, 2)} for _ in range(5)]
    ev = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=torch.nn.Identity(),
                             decollate=False)
    bar = ProgressBar(leave=False, file=io.StringIO())
    bar.attach(ev)
    ev.run(7)  # what ValidationHandler does at the trainer's epoch 7
    ev.run(8)
    assert bar.history == [(0, 5, 5), (0, 5, 5)]


# ----------------------------------------------------------------------------------------- TensorBoard
def _read_images(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    assert tag in acc.Tags()["images"]
    return acc.Images(tag)


def test_tensorboard_examples_writes_an_image_per_validation(tmp_path):
    calls = []

    def render(batch, output, n):
        calls.append((batch["image"].shape, list(batch["id"]), output["pred"].shape, n,
                      batch["image"].requires_grad, batch["image"].device.type))
        return np.full((24, 40, 3), 200, dtype=np.uint8)

    def step(engine, batch):
        return {"pred": batch["image"] * 2}

    data = [{"image": torch.rand(5, 1, 8, 8, requires_grad=True), "id": [f"b{j}_{i}" for i in range(5)]}
            for j in range(3)]
    engine = Engine(step)
    handler = TensorBoardExamples(render, n=3, tag="val/examples", log_dir=str(tmp_path))
    handler.attach(engine)
    engine.run(data, max_epochs=2)
    handler.close()
    # kept: the first 3 items of the FIRST batch, detached, on CPU, once per epoch
    assert calls == [((3, 1, 8, 8), ["b0_0", "b0_1", "b0_2"], (3, 1, 8, 8), 3, False, "cpu")] * 2
    images = _read_images(tmp_path, "val/examples")
    assert [im.step for im in images] == [1, 2]
    assert (images[0].width, images[0].height) == (40, 24)


def test_tensorboard_examples_accumulates_small_decollated_batches(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    seen = []

    def render(batch, output, n):
        seen.append([o["value"].item() for o in output])
        return np.zeros((8, 8, 3), dtype=np.uint8)

    engine = Engine(lambda e, b: [{"value": torch.tensor(float(b))}])  # batch size 1, decollated output
    writer = SummaryWriter(str(tmp_path))
    TensorBoardExamples(render, n=2, keep=3, summary_writer=writer, tag="ex").attach(engine)
    engine.run([1, 2, 3, 4, 5], max_epochs=1)
    writer.close()
    assert seen == [[1.0, 2.0, 3.0]]
    assert _read_images(tmp_path, "ex")[0].step == 1


def test_tensorboard_examples_render_errors_are_logged_not_raised(tmp_path, caplog):
    def bad_render(batch, output, n):
        return np.zeros((4, 4), dtype=np.uint8)  # not H x W x 3

    engine = Engine(lambda e, b: {"x": torch.zeros(2)})
    TensorBoardExamples(bad_render, n=1, log_dir=str(tmp_path)).attach(engine)
    engine.run([0], max_epochs=1)
    assert "could not render" in caplog.text
    strict = Engine(lambda e, b: {"x": torch.zeros(2)})
    TensorBoardExamples(bad_render, n=1, log_dir=str(tmp_path), strict=True).attach(strict)
    with pytest.raises(ValueError, match="H, W, 3"):
        strict.run([0], max_epochs=1)


def test_take_and_merge_items():
    batch = {"x": torch.arange(10.0).reshape(5, 2), "ids": list("abcde"), "scalar": torch.tensor(1.0)}
    kept = take_items(batch, 2)
    assert kept["x"].shape == (2, 2) and kept["ids"] == ["a", "b"] and kept["scalar"].ndim == 0
    more = merge_items(take_items(batch, 2), take_items(batch, 1))
    assert more["x"].shape == (3, 2) and more["ids"] == ["a", "b", "a"]
    with pytest.raises(ValueError):
        merge_items({"x": torch.zeros(1, 2)}, {"x": torch.zeros(1, 3)})


# ----------------------------------------------------------------------------------------- renderers
S = 64


def _footprint_maps(k: int, rng: np.random.Generator) -> np.ndarray:
    """``k x S x S`` maps in network units (mm / 3), 0 outside a disc footprint."""
    yy, xx = np.mgrid[:S, :S]
    disc = (yy - S / 2) ** 2 + (xx - S / 2) ** 2 < (S / 2.5) ** 2
    return (rng.uniform(0.3, 1.0, (k, S, S)) * disc).astype(np.float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Unit rows with positive entries (positive cosine similarities, like trained MRIS embeddings)."""
    x = x.abs() + 0.05
    return x / x.norm(dim=1, keepdim=True)


def _check_rgb(img):
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img.std() > 5  # not a blank canvas


@pytest.mark.parametrize("variant", ["combined", "separate"])
def test_mris_render(variant, tmp_path):
    from pipeline.mris.tb_examples import render_examples

    rng = np.random.default_rng(0)
    k = 6
    fc, tc = torch.from_numpy(_footprint_maps(k, rng)), torch.from_numpy(_footprint_maps(k, rng))
    batch = {"image": torch.rand(k, 1, S, S), "subject_id": ["a", "a", "b", "c", "d", "e"],
             "knee_id": [f"k{i}" for i in range(k)], "visit_month": torch.tensor([0, 12, 0, 0, 0, 0]),
             "klg": torch.tensor([0, 1, 2, 3, 4, 2])}
    if variant == "combined":
        batch["maps"] = torch.cat([fc, tc], 1)[:, None]  # K x 1 x 2S x S
        output = {"xray_emb": _unit(torch.randn(k, 16)), "map_emb": _unit(torch.randn(k, 16))}
    else:
        batch["fc"], batch["tc"] = fc[:, None], tc[:, None]
        output = {"xray_emb": {m: _unit(torch.randn(k, 16)) for m in ("fc", "tc")},
                  "map_emb": {m: _unit(torch.randn(k, 16)) for m in ("fc", "tc")}}
    img = render_examples(batch, output, 4)
    _check_rgb(img)
    if variant == "combined":
        from PIL import Image

        Image.fromarray(img).save(tmp_path / "mris.png")


def test_mris_batch_knn_excludes_the_same_subject():
    from pipeline.mris.tb_examples import batch_knn_maps, true_maps_mm

    rng = np.random.default_rng(1)
    maps_net = np.stack([np.full((S, S), v, np.float32) for v in (0.1, 0.2, 0.3, 0.4)])
    batch = {"maps": torch.from_numpy(np.concatenate([maps_net, maps_net], 1))[:, None]}
    maps, masks = true_maps_mm(batch)
    assert np.allclose(maps["fc"][2], 0.9) and masks["fc"].all()
    emb = _unit(torch.from_numpy(rng.normal(size=(4, 8)).astype(np.float32)))
    query = emb.clone()
    query[0] = emb[1]  # item 0's radiograph looks exactly like item 1's map ...
    synth, k_used, n_db = batch_knn_maps(0, query, emb, maps, masks, ["a", "a", "b", "c"], k=1)
    assert (k_used, n_db) == (1, 2)  # ... but item 1 is the same subject: only items 2, 3 are candidates
    assert np.allclose(synth["fc"], maps["fc"][2]) or np.allclose(synth["fc"], maps["fc"][3])
    synth, _, _ = batch_knn_maps(0, query, emb, maps, masks, None, k=1)
    assert np.allclose(synth["fc"], maps["fc"][1])  # without subject ids item 1 is allowed


def test_kneel_render():
    from pipeline.landmarks.tb_examples import render_examples

    label = torch.rand(3, 16, 2) * 0.8 + 0.1
    output = {"image": torch.rand(3, 1, S, S), "label": label, "pred": label + 0.02}
    _check_rgb(render_examples(None, output, 4, mm_per_unit=135.0))
    _check_rgb(render_examples({"image": output["image"]}, {"pred": label[:, :1], "label": label[:, :1]}, 2))


def test_dess_seg_render_from_volumes_and_slices():
    from monai.networks.utils import one_hot

    from pipeline.segmentation.tb_examples import render_examples, sagittal_slices

    rng = np.random.default_rng(2)
    items = []
    for _ in range(2):
        lab = torch.from_numpy(rng.integers(0, 5, (1, S, S, 16))).float()
        items.append({"image": torch.rand(1, S, S, 16), "label": one_hot(lab[None], 5)[0],
                      "pred": one_hot(lab[None], 5)[0]})
    slices = sagittal_slices(items)
    assert slices[0]["image"].shape == (S, S) and slices[0]["label"].dtype == np.int16
    assert slices[0]["label"].max() <= 4
    _check_rgb(render_examples(None, items, 4))
    _check_rgb(render_examples(None, slices, 4))


def test_direct_synthesis_render():
    from pipeline.baselines.tb_examples import render_examples

    rng = np.random.default_rng(3)
    maps = torch.from_numpy(np.stack([_footprint_maps(3, rng), _footprint_maps(3, rng)], 1))  # 3 x 2 x S x S
    output = {"pred": maps + 0.05, "label": maps, "mask": (maps > 0).float()}
    _check_rgb(render_examples({"image": torch.rand(3, 1, S, S)}, output, 4))
