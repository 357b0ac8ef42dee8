"""Progression networks: "2D + TRF" (Panfilov et al., ISBI 2022) and the baselines, behind one factory.

Input of the MR networks: ``B x 1 x S x H x W`` float volumes, S sagittal slices (the first spatial axis
after the channel, medial <-> lateral), each slice an H x W sagittal image in pixels (the paper: 64 slices
of 160 x 160, its 320 x 320 x 128 DESS crop downsampled x 2); right knees are flipped to the left-knee
convention upstream and intensities min-max scaled to [0, 1] per volume. Output: ``B x 3`` logits (0 none, 1 fast, 2 slow;
:mod:`pipeline.progression.labels`).

* ``"trf"`` (:class:`SliceTransformer`, "2D + TRF"): a MONAI ResNet-50 slice encoder (2D, one input channel,
  global average pooling, no head: 2048 features per slice at ``widen_factor=1``) run ONCE over the
  ``B * S`` slices (``B x 1 x S x H x W -> (B S) x 1 x H x W``), a linear token embedding to ``token_dim``, a
  learned class token and learned positional embeddings for ``S + 1`` tokens, embedding dropout, ``layers``
  pre-norm Transformer blocks (``torch.nn.TransformerEncoderLayer``, ``heads`` heads, feed-forward width
  ``mlp_dim``, GELU, dropout), and a head on the class token (LayerNorm -> Linear(token_dim, mlp_dim) -> GELU
  -> Dropout -> Linear(mlp_dim, 3)). Pre-norm (``norm_first=True``) and the GELU head follow the authors'
  public code; at the paper's settings (token_dim = mlp_dim = 2048, 8 heads, 4 blocks, dropout 0.1) the
  network has about 133 M parameters (:data:`PAPER_PARAMETERS`).
* ``"fc"`` (:class:`SliceConcatMLP`, "2D + FC"): the same slice encoder, the S feature vectors concatenated
  -> Linear(S * D, 512) -> ReLU -> Dropout(0.2) -> Linear(512, 3).
* ``"lstm"`` (:class:`SliceBiLSTM`, "2D + BiLSTM"): the same slice encoder, a 2-layer bidirectional LSTM
  (hidden 256, dropout 0.1) over the slices, the forward state after the last slice and the backward state
  after the first concatenated -> Linear(512, 3).
* ``"cnn3d"`` (:class:`VolumeCNN`): a MONAI 3D ResNet (``depth`` 18/34/50; the paper's 3D baselines were a
  ResNeXt-50 and a ShuffleNet) on the whole volume -> 3 logits.
* ``"xray"`` (:class:`RadiographCNN`): a MONAI 2D ResNet-18 on the baseline knee radiograph ROI
  ``B x 1 x H x W`` (the ROI chain of ``transforms/``, left-knee convention) -> 3 logits.

Every ResNet uses the original stem (7 x 7 convolution with stride ``stem_stride`` = 2, then max-pooling) and no
bias in the shortcut convolutions (the torchvision layout, so ImageNet weights could be loaded). Networks built
by :func:`make_progression_network` describe themselves (:mod:`pipeline.nets.describe`), so a checkpoint
rebuilds its network (:func:`load_progression_network`, :func:`pipeline.io.checkpoints.load_network`).
``widen_factor`` < 1 and small ``token_dim`` / ``mlp_dim`` are for tests and CPU demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from monai.networks.nets import resnet18, resnet34, resnet50
from torch import nn

from pipeline.io.checkpoints import load_network
from pipeline.nets.describe import DescribedModule, network_factory

__all__ = ["ARCHS", "DEFAULTS", "PAPER_PARAMETERS", "RadiographCNN", "SliceBiLSTM", "SliceConcatMLP",
           "SliceEncoder", "SliceTransformer", "VolumeCNN", "count_parameters", "load_progression_network",
           "make_progression_network"]

#: Parameter count of the paper's "2D + TRF" (about 133 M).
PAPER_PARAMETERS = 133e6
ARCHS = ("trf", "fc", "lstm", "cnn3d", "xray")
NUM_CLASSES = 3
_RESNETS = {18: resnet18, 34: resnet34, 50: resnet50}

#: Every setting of :func:`make_progression_network` and its default (the paper's sizes).
DEFAULTS: dict[str, Any] = {
    "num_slices": 64, "widen_factor": 1.0, "encoder_depth": 50, "stem_stride": 2,
    "token_dim": 2048, "heads": 8, "layers": 4, "mlp_dim": 2048, "dropout": 0.1, "emb_dropout": 0.1,
    "fc_hidden": 512, "fc_dropout": 0.2, "lstm_hidden": 256, "lstm_layers": 2, "lstm_dropout": 0.1,
    "cnn3d_depth": 50, "xray_depth": 18,
}
#: The settings that define each architecture (recorded in its checkpoints).
ARCH_SETTINGS: dict[str, tuple[str, ...]] = {
    "trf": ("num_slices", "widen_factor", "encoder_depth", "stem_stride", "token_dim", "heads", "layers",
            "mlp_dim", "dropout", "emb_dropout"),
    "fc": ("num_slices", "widen_factor", "encoder_depth", "stem_stride", "fc_hidden", "fc_dropout"),
    "lstm": ("num_slices", "widen_factor", "encoder_depth", "stem_stride", "lstm_hidden", "lstm_layers",
             "lstm_dropout"),
    "cnn3d": ("num_slices", "widen_factor", "cnn3d_depth", "stem_stride"),
    "xray": ("widen_factor", "xray_depth", "stem_stride"),
}
#: The input each architecture expects (recorded as preprocessing).
INPUTS = {
    "mr": ("B x 1 x S x H x W baseline sagittal DESS, S sagittal slices first, right knees flipped to left, "
           "min-max [0, 1] per volume"),
    "xray": "B x 1 x H x W baseline knee radiograph ROI (transforms/ ROI chain, left-knee convention)",
}

PathLike = Union[str, Path]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def _resnet(depth: int, spatial_dims: int, widen_factor: float, stem_stride: int,
            num_classes: Optional[int]) -> nn.Module:
    if depth not in _RESNETS:
        raise ValueError(f"ResNet depth must be one of {sorted(_RESNETS)}, got {depth}")
    return _RESNETS[depth](spatial_dims=spatial_dims, n_input_channels=1, conv1_t_stride=stem_stride,
                           widen_factor=widen_factor, bias_downsample=False,
                           feed_forward=num_classes is not None, num_classes=num_classes or 1)


def _check_volume(x: torch.Tensor, name: str, num_slices: Optional[int] = None) -> None:
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name} expects volumes B x 1 x S x H x W (S sagittal slices), got shape {list(x.shape)}")
    if num_slices is not None and x.shape[2] != num_slices:
        raise ValueError(f"{name} was built for {num_slices} slices, got {x.shape[2]} (shape {list(x.shape)}); "
                         "resample the volume to the slice count in the network's settings")


class SliceEncoder(nn.Module):
    """2D MONAI ResNet (no head, global average pooling) applied to every sagittal slice in ONE forward.

    ``forward(x)``: ``B x 1 x S x H x W -> B x S x out_dim`` (``out_dim`` = 2048 for ResNet-50 at width 1).
    The slices of all volumes are stacked into one ``(B S) x 1 x H x W`` batch (volume-major: row
    ``b * S + s`` is slice ``s`` of volume ``b``), encoded, and unstacked.
    """

    def __init__(self, depth: int = 50, widen_factor: float = 1.0, stem_stride: int = 2) -> None:
        super().__init__()
        self.net = _resnet(depth, 2, widen_factor, stem_stride, None)
        convs = [m for m in self.net.layer4[-1].modules() if isinstance(m, nn.Conv2d)]
        self.out_dim = int(convs[-1].out_channels)  # the last block's last convolution

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``N x 1 x H x W`` slices -> ``N x out_dim`` features."""
        return self.net(images)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, type(self).__name__)
        b, _, s, h, w = x.shape
        feats = self.net(x.transpose(1, 2).reshape(b * s, 1, h, w))
        return feats.reshape(b, s, -1)


class _SliceModel(DescribedModule):
    """A slice encoder followed by an aggregator over the slice features (``B x S x D``)."""

    def __init__(self, num_slices: int, widen_factor: float, encoder_depth: int, stem_stride: int) -> None:
        super().__init__()
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        self.num_slices = int(num_slices)
        self.encoder = SliceEncoder(encoder_depth, widen_factor, stem_stride)

    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x 1 x S x H x W`` volumes -> ``B x 3`` logits."""
        _check_volume(x, type(self).__name__, self.num_slices)
        return self.aggregate(self.encoder(x))


class SliceTransformer(_SliceModel):
    """"2D + TRF" (module docstring): slice features -> tokens -> class token + positions -> Transformer ->
    head on the class token."""

    def __init__(self, num_slices: int = 64, widen_factor: float = 1.0, encoder_depth: int = 50,
                 stem_stride: int = 2, token_dim: int = 2048, heads: int = 8, layers: int = 4, mlp_dim: int = 2048,
                 dropout: float = 0.1, emb_dropout: float = 0.1) -> None:
        super().__init__(num_slices, widen_factor, encoder_depth, stem_stride)
        if token_dim % heads:
            raise ValueError(f"token_dim ({token_dim}) must be a multiple of heads ({heads})")
        self.embed = nn.Linear(self.encoder.out_dim, token_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, token_dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_slices + 1, token_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.emb_dropout = nn.Dropout(emb_dropout)
        block = nn.TransformerEncoderLayer(token_dim, heads, dim_feedforward=mlp_dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, mlp_dim), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(mlp_dim, NUM_CLASSES))

    def tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """``B x S x D`` slice features -> ``B x (S + 1) x token_dim`` Transformer output (class token first)."""
        x = self.embed(feats)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.transformer(self.emb_dropout(x))

    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(feats)[:, 0])


class SliceConcatMLP(_SliceModel):
    """"2D + FC": the S slice features concatenated -> MLP -> 3 logits."""

    def __init__(self, num_slices: int = 64, widen_factor: float = 1.0, encoder_depth: int = 50,
                 stem_stride: int = 2, fc_hidden: int = 512, fc_dropout: float = 0.2) -> None:
        super().__init__(num_slices, widen_factor, encoder_depth, stem_stride)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(num_slices * self.encoder.out_dim, fc_hidden), nn.ReLU(),
                                 nn.Dropout(fc_dropout), nn.Linear(fc_hidden, NUM_CLASSES))

    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(feats)


class SliceBiLSTM(_SliceModel):
    """"2D + BiLSTM": a bidirectional LSTM over the slice features; [forward after the last slice, backward
    after the first] -> Linear -> 3 logits."""

    def __init__(self, num_slices: int = 64, widen_factor: float = 1.0, encoder_depth: int = 50,
                 stem_stride: int = 2, lstm_hidden: int = 256, lstm_layers: int = 2,
                 lstm_dropout: float = 0.1) -> None:
        super().__init__(num_slices, widen_factor, encoder_depth, stem_stride)
        self.lstm = nn.LSTM(self.encoder.out_dim, lstm_hidden, num_layers=lstm_layers, batch_first=True,
                            bidirectional=True, dropout=lstm_dropout if lstm_layers > 1 else 0.0)
        self.fc = nn.Linear(2 * lstm_hidden, NUM_CLASSES)

    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(feats)  # B x S x 2 hidden: [forward, backward]
        h = out.shape[-1] // 2
        return self.fc(torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=1))


class VolumeCNN(DescribedModule):
    """3D MONAI ResNet on the whole ``B x 1 x S x H x W`` volume -> ``B x 3`` logits."""

    def __init__(self, num_slices: int = 64, widen_factor: float = 1.0, cnn3d_depth: int = 50,
                 stem_stride: int = 2) -> None:
        super().__init__()
        self.num_slices = int(num_slices)
        self.net = _resnet(cnn3d_depth, 3, widen_factor, stem_stride, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_volume(x, type(self).__name__, self.num_slices)
        return self.net(x)


class RadiographCNN(DescribedModule):
    """2D MONAI ResNet on the baseline knee radiograph ROI ``B x 1 x H x W`` -> ``B x 3`` logits."""

    def __init__(self, widen_factor: float = 1.0, xray_depth: int = 18, stem_stride: int = 2) -> None:
        super().__init__()
        self.net = _resnet(xray_depth, 2, widen_factor, stem_stride, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"RadiographCNN expects a knee ROI B x 1 x H x W, got shape {list(x.shape)}")
        return self.net(x)


_CLASSES = {"trf": SliceTransformer, "fc": SliceConcatMLP, "lstm": SliceBiLSTM, "cnn3d": VolumeCNN,
            "xray": RadiographCNN}


@network_factory
def make_progression_network(arch: str = "trf", image_size: Optional[int] = None, **settings: Any) -> nn.Module:
    """The progression network ``arch`` (``"trf"``, ``"fc"``, ``"lstm"``, ``"cnn3d"``, ``"xray"``; module
    docstring) with ``settings`` (names and paper defaults in :data:`DEFAULTS`; ``None`` = default).

    Only the settings of ``arch`` (:data:`ARCH_SETTINGS`) are accepted; they are recorded with ``arch`` in the
    network's description, and the expected input (:data:`INPUTS`, ``image_size`` in pixels, ``None`` = not
    specified) as its preprocessing, so its checkpoints rebuild it (:func:`load_progression_network`).
    """
    if arch not in _CLASSES:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    names = ARCH_SETTINGS[arch]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"arch {arch!r} takes the settings {list(names)}, not {unknown}")
    s = {k: DEFAULTS[k] if settings.get(k) is None else settings[k] for k in names}
    s = {k: type(DEFAULTS[k])(v) for k, v in s.items()}
    net = _CLASSES[arch](**s)
    preprocessing = {"input": INPUTS["xray" if arch == "xray" else "mr"], "image_size": image_size}
    return net.describe(make_progression_network, {"arch": arch, **s}, preprocessing)


def load_progression_network(checkpoint: PathLike, arch: Optional[str] = None, **settings: Any) -> nn.Module:
    """The progression network of ``checkpoint`` with its weights, rebuilt from the checkpoint's own record;
    settings given here (``None`` = not given) must agree with it."""
    return load_network(checkpoint, fallback=make_progression_network, arch=arch, **settings)
