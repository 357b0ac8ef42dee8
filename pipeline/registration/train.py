"""The training stages of segmentation-guided registration, as the bundle's configs call them.

* Stage 1 (``train_stage1.json``): GradICON on DXA image pairs (signed LNCC), then
  :func:`augment_by_registration` warps each of the ``n_labelled`` manually labelled DXA images (and its label
  map, nearest neighbour) onto every unlabelled training DXA image -> ``augmented.npz`` (N x M samples).
* Stage 2 (``train_segmenter.json``, ``train_cyclegan.json``): :func:`train_dxa_segmenter_stage` on the manual +
  augmented set; :func:`train_xray_segmenter_stage` adapts it to radiographs by CycleGAN with semantic
  consistency (no radiograph label is read).
* Stage 3 (``train_stage3.json``): GradICON on label maps (:func:`registration_pools` ``"labels"``): the
  manual DXA labels and both segmenters' predictions on the training images, pooled, pairs within and
  across modalities.
* Image-similarity baselines (``train_baseline_lncc.json``, ``train_baseline_mi.json``): GradICON on
  DXA/radiograph image pairs (``"cross"``).

Files in ``ckpt_dir``: ``stage1.pt``, ``augmented.npz``, ``segmenter_dxa.pt``, ``segmenter_xray.pt``,
``stage3.pt``, ``baseline_lncc.pt``, ``baseline_mi.pt`` (+ a preview PNG of the augmentation).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.io.atomic import atomic_path
from pipeline.io.checkpoints import load_network
from pipeline.registration.data import (
    PairDataset,
    all_pairs,
    load_role_arrays,
    load_roles,
    onehot,
)

PAIR_KINDS = ("dxa", "cross", "labels")
STAGE_COMMANDS = {
    "stage1.pt": "python -m monai.bundle run training --config_file bundles/segreg/configs/train_stage1.json",
    "segmenter_dxa.pt": "python -m monai.bundle run training --config_file bundles/segreg/configs/train_segmenter.json",
    "segmenter_xray.pt": "python -m monai.bundle run training --config_file bundles/segreg/configs/train_cyclegan.json",
    "augmented.npz": "python -m monai.bundle run training --config_file bundles/segreg/configs/train_stage1.json",
}


def _need(ckpt_dir: str | os.PathLike, name: str) -> Path:
    from pipeline.user_errors import require_checkpoint

    return require_checkpoint(Path(ckpt_dir) / name, STAGE_COMMANDS.get(name, "the earlier stage"))


def _predict(net_path: Path, images: np.ndarray, device: torch.device, batch: int = 16) -> np.ndarray:
    net = load_network(net_path).to(device).eval()
    return segment(net, images, batch).numpy()


def segment(net: torch.nn.Module, images: np.ndarray | torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Bone labels (``N x 1 x H x W`` int64, CPU) of images in [0, 1] (``N x 1 x H x W``): each image is put in
    the segmenters' [-1, 1] input range (:func:`pipeline.registration.segmenters.to_model_range`) first."""
    from pipeline.registration.segmenters import predict_labels, to_model_range

    return predict_labels(net, to_model_range(torch.as_tensor(images).cpu()), batch_size=batch)


def registration_pools(manifest: str | os.PathLike, pairs: str, image_size: int | None = 256, n_labelled: int = 5,
                       test_fraction: float = 0.25, split_seed: int = 0, ckpt_dir: str | os.PathLike = "",
                       device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, bool]:
    """``(moving pool, fixed pool, same_pool)`` for a GradICON training stage, ``N x C x H x W`` float32.

    ``"dxa"``: every training DXA image, both pools; ``"cross"``: training DXA images -> training radiographs;
    ``"labels"``: one-hot label maps (C = 4) pooled from the manual DXA labels and the two segmenters'
    predictions on the training DXA images and radiographs (needs ``segmenter_dxa.pt`` and
    ``segmenter_xray.pt`` in ``ckpt_dir``)."""
    if pairs not in PAIR_KINDS:
        raise ValueError(f"pairs must be one of {PAIR_KINDS}, got {pairs!r}")
    table, roles = load_roles(manifest, n_labelled, test_fraction, split_seed)
    dxa_rows = roles.labelled_dxa + roles.unlabelled_dxa
    if pairs == "dxa":
        imgs = load_role_arrays(table, dxa_rows, "dxa_crop", image_size)
        return imgs, imgs, True
    if pairs == "cross":
        return (load_role_arrays(table, dxa_rows, "dxa_crop", image_size),
                load_role_arrays(table, roles.train_xray, "xray_crop", image_size), False)
    device = torch.device(device)
    manual = load_role_arrays(table, roles.labelled_dxa, "dxa_crop_labels", image_size)
    dxa = load_role_arrays(table, dxa_rows, "dxa_crop", image_size)
    xray = load_role_arrays(table, roles.train_xray, "xray_crop", image_size)
    pred_dxa = _predict(_need(ckpt_dir, "segmenter_dxa.pt"), dxa, device)
    pred_xray = _predict(_need(ckpt_dir, "segmenter_xray.pt"), xray, device)
    pooled = onehot(np.concatenate([manual, pred_dxa, pred_xray])).numpy()
    return pooled, pooled, True


def pair_dataset(pools: tuple[np.ndarray, np.ndarray, bool], max_pairs: int | None = 20000,
                 seed: int = 0) -> PairDataset:
    """All (or ``max_pairs`` random) ordered pairs of the pools as a :class:`PairDataset`."""
    moving, fixed, same = pools
    return PairDataset(moving, fixed, all_pairs(len(moving), len(fixed), same, max_pairs, seed))


def augment_by_registration(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, image_size: int | None = 256,
                            n_labelled: int = 5, test_fraction: float = 0.25, split_seed: int = 0,
                            network: str = "stage1.pt", device: str | torch.device = "cpu",
                            batch: int = 8, progress: bool = True) -> Path:
    """Warp each labelled DXA image and its labels (nearest neighbour) onto every unlabelled training DXA image
    with the stage-1 network; write ``augmented.npz`` (``images`` float32, ``labels`` int64, ``N*M x 1 x H x W``;
    ``source``/``target`` = manifest row indices) and a preview PNG; return the npz path."""
    from tqdm.auto import tqdm

    from pipeline.registration.maps import warp, warp_labels
    from pipeline.registration.step import register

    device = torch.device(device)
    table, roles = load_roles(manifest, n_labelled, test_fraction, split_seed)
    net = load_network(_need(ckpt_dir, network)).to(device).eval()
    src = torch.as_tensor(load_role_arrays(table, roles.labelled_dxa, "dxa_crop", image_size))
    src_lab = torch.as_tensor(load_role_arrays(table, roles.labelled_dxa, "dxa_crop_labels", image_size))
    tgt = torch.as_tensor(load_role_arrays(table, roles.unlabelled_dxa, "dxa_crop", image_size))
    images, labels, source, target = [], [], [], []
    bar = tqdm(total=len(src) * len(tgt), desc="augmentation by registration", unit="pair", disable=not progress)
    for i in range(len(src)):
        for s in range(0, len(tgt), batch):
            f = tgt[s:s + batch].to(device)
            m = src[i:i + 1].expand(len(f), -1, -1, -1).to(device)
            phi = register(net, m, f)
            images.append(warp(m, phi).cpu().numpy())
            labels.append(warp_labels(src_lab[i:i + 1].expand(len(f), -1, -1, -1).to(device), phi,
                                      method="nearest").cpu().numpy())
            source += [roles.labelled_dxa[i]] * len(f)
            target += roles.unlabelled_dxa[s:s + batch]
            bar.update(len(f))
    bar.close()
    out = Path(ckpt_dir) / "augmented.npz"
    with atomic_path(out, suffix=".npz") as tmp:
        np.savez_compressed(tmp, images=np.concatenate(images).astype(np.float32),
                            labels=np.concatenate(labels).astype(np.int64), source=np.asarray(source),
                            target=np.asarray(target))
    _preview(out.with_suffix(".png"), np.concatenate(images), np.concatenate(labels))
    return out


def _preview(path: Path, images: np.ndarray, labels: np.ndarray, n: int = 6) -> None:
    """A row of augmented images with their warped label contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(images))
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n, 2.4), squeeze=False)
    for k, ax in enumerate(axes[0]):
        idx = int(k * (len(images) - 1) / max(n - 1, 1))
        ax.imshow(images[idx, 0], cmap="gray")
        for lab, colour in ((1, "tab:red"), (2, "tab:green"), (3, "tab:blue")):
            if (labels[idx, 0] == lab).any():
                ax.contour(labels[idx, 0] == lab, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"augmented #{idx}", fontsize=8)
        ax.axis("off")
    fig.suptitle("stage 1: labelled DXA warped onto unlabelled DXA (femur red, tibia green, fibula blue)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def segmenter_training_set(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, image_size: int | None = 256,
                           n_labelled: int = 5, test_fraction: float = 0.25, split_seed: int = 0,
                           val_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """The DXA segmenter's data: the manual images + the augmented set (``augmented.npz``). Validation = the
    augmented samples whose TARGET image is in a held-out ``val_fraction`` of the unlabelled DXA images (no
    manual label beyond the ``n_labelled`` is used). Keys ``train_images``, ``train_labels``, ``val_images``,
    ``val_labels``."""
    table, roles = load_roles(manifest, n_labelled, test_fraction, split_seed)
    man_img = load_role_arrays(table, roles.labelled_dxa, "dxa_crop", image_size)
    man_lab = load_role_arrays(table, roles.labelled_dxa, "dxa_crop_labels", image_size)
    aug = np.load(_need(ckpt_dir, "augmented.npz"))
    if aug["images"].shape[-1] != man_img.shape[-1]:
        raise ValueError(f"augmented.npz holds {aug['images'].shape[-1]} px images, this run uses {man_img.shape[-1]} "
                         "px: re-run stage 1 with the same image_size")
    targets = sorted(set(aug["target"].tolist()))
    n_val = max(1, int(round(val_fraction * len(targets)))) if val_fraction > 0 and len(targets) > 1 else 0
    val_t = set(np.random.default_rng(split_seed).choice(targets, size=n_val, replace=False).tolist()) if n_val else set()
    is_val = np.isin(aug["target"], list(val_t))
    return {"train_images": np.concatenate([man_img, aug["images"][~is_val]]),
            "train_labels": np.concatenate([man_lab, aug["labels"][~is_val]]),
            "val_images": aug["images"][is_val] if is_val.any() else man_img,
            "val_labels": aug["labels"][is_val] if is_val.any() else man_lab}


def cyclegan_training_set(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, image_size: int | None = 256,
                          n_labelled: int = 5, test_fraction: float = 0.25, split_seed: int = 0) -> dict[str, np.ndarray]:
    """CycleGAN data: source = DXA images with labels (manual + augmented), target = training radiographs
    (images only). Keys ``source_images``, ``source_labels``, ``target_images``."""
    seg = segmenter_training_set(manifest, ckpt_dir, image_size, n_labelled, test_fraction, split_seed, val_fraction=0.0)
    table, roles = load_roles(manifest, n_labelled, test_fraction, split_seed)
    return {"source_images": seg["train_images"], "source_labels": seg["train_labels"],
            "target_images": load_role_arrays(table, roles.train_xray, "xray_crop", image_size)}


def train_dxa_segmenter_stage(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, network: torch.nn.Module,
                              image_size: int | None = 256, n_labelled: int = 5, test_fraction: float = 0.25,
                              split_seed: int = 0, val_fraction: float = 0.1, steps: int = 5000, batch_size: int = 12,
                              lr: float = 5e-4, val_interval: int = 250, seed: int = 0,
                              device: str | torch.device = "cpu", ckpt_name: str = "segmenter_dxa.pt") -> Path:
    """Stage 2a: the DXA segmenter on the manual + augmented DXA images (:func:`segmenter_training_set`), best
    validation Dice kept; written to ``ckpt_dir/ckpt_name``."""
    from pipeline.registration.segmenters import to_model_range, train_segmenter

    data = segmenter_training_set(manifest, ckpt_dir, image_size, n_labelled, test_fraction, split_seed, val_fraction)
    out = Path(ckpt_dir) / ckpt_name
    train_segmenter(to_model_range(data["train_images"]), data["train_labels"], to_model_range(data["val_images"]),
                    data["val_labels"], network=network, steps=steps, batch_size=batch_size, lr=lr,
                    val_interval=val_interval, seed=seed, device=device, save_path=out)
    return out


def train_xray_segmenter_stage(manifest: str | os.PathLike, ckpt_dir: str | os.PathLike, image_size: int | None = 256,
                               n_labelled: int = 5, test_fraction: float = 0.25, split_seed: int = 0,
                               epochs_constant: int = 150, epochs_decay: int = 50, epoch_length: int | None = None,
                               ngf: int = 64, n_blocks: int = 9, ndf: int = 64, pool_size: int = 50, seed: int = 0,
                               device: str | torch.device = "cpu", ckpt_name: str = "segmenter_xray.pt") -> Path:
    """Stage 2b: the radiograph segmenter S_T by CycleGAN adaptation of the DXA segmenter (``segmenter_dxa.pt``,
    frozen) with semantic consistency; no radiograph label is read. Written to ``ckpt_dir/ckpt_name``."""
    from pipeline.registration.cyclegan import train_cyclegan
    from pipeline.registration.segmenters import to_model_range

    seg_s = load_network(_need(ckpt_dir, "segmenter_dxa.pt")).to(torch.device(device))
    data = cyclegan_training_set(manifest, ckpt_dir, image_size, n_labelled, test_fraction, split_seed)
    seg_t, _ = train_cyclegan(to_model_range(data["source_images"]), data["source_labels"],
                              to_model_range(data["target_images"]), seg_s, epochs_constant=epochs_constant,
                              epochs_decay=epochs_decay, epoch_length=epoch_length, ngf=ngf, n_blocks=n_blocks,
                              ndf=ndf, pool_size=pool_size, seed=seed, device=device)
    out = Path(ckpt_dir) / ckpt_name
    with atomic_path(out, suffix=".pt") as tmp:
        torch.save(seg_t.state_dict(), tmp)
    return out
