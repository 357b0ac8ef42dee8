"""MRIS dual encoder: two independent ResNet-18 trunks (radiograph ``f`` and thickness map ``g``).

Each encoder is MONAI's 2D ``resnet18`` with the original ResNet stem (7 x 7 convolution, stride 2, then
max-pooling), no classification head, global average pooling and L2 normalisation:

    input  B x C x H x W  (C = 1: a radiograph ROI, or a thickness map in mm / 3 with NaN -> 0)
    output B x D          (D = 512 at full width; unit vectors)

MRIS-C uses one :class:`DualEncoder` (thickness input = FC and TC stacked vertically into one image);
MRIS-S uses :class:`MRISSeparate`, one :class:`EncoderPair` per map key (``"fc"``, ``"tc"``).

:class:`DualEncoder` and :class:`MRISSeparate` are self-describing (:class:`pipeline.nets.describe.DescribedModule`):
built by :func:`pipeline.mris.engine.make_network`, they carry the factory settings and the preprocessing they
expect in their state dict (``_extra_state``), so a checkpoint rebuilds its network
(:func:`pipeline.io.checkpoints.load_network`). :class:`EncoderPair` is the plain pair inside both.

For inference, export and MONAI's bundle checks (``verify_net_in_out``, ``ckpt_export``), which call a
network with ONE image, :class:`RadiographDualEncoder` / :class:`RadiographMRISSeparate` are the same
models (same state-dict keys: training checkpoints load with ``strict=True``) whose ``forward(x)`` returns
only the radiograph embedding; they (and :class:`ImageEncoder`) are TorchScript-compatible.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import nn

from pipeline.conventions import MAP_KEYS
from pipeline.nets.describe import DescribedModule

__all__ = [
    "ImageEncoder",
    "EncoderPair",
    "DualEncoder",
    "MRISSeparate",
    "RadiographDualEncoder",
    "RadiographMRISSeparate",
    "count_parameters",
]

#: Number of parameters of the full-width MRIS pair reported in the paper (22.4 M).
PAPER_PARAMETERS = 22.4e6


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``; only those with ``requires_grad`` if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ImageEncoder(nn.Module):
    """ResNet-18 trunk -> global average pooling -> (optionally) L2-normalised feature vector.

    Args:
        in_channels: input channels (1 for grayscale; 3 only when feeding repeated grayscale).
        widen_factor: channel multiplier of the trunk (1.0 = ResNet-18, output dim 512). Use e.g. 0.125
            in tests (output dim 64).
        stem_stride: stride of the 7 x 7 stem convolution; 2 as in the original ResNet (MONAI's default of
            1 costs about 4x the compute for the same output size).
        normalize: L2-normalise the output (the MRIS embedding). ``False`` returns raw pooled features.
        bias_downsample: bias in the 1 x 1 shortcut convolutions. ``False`` (default) matches the
            torchvision / original ResNet layout, so ImageNet checkpoints load with ``strict=True``.

    Shapes: ``forward(x)`` maps ``B x in_channels x H x W`` to ``B x out_dim``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widen_factor: float = 1.0,
        stem_stride: int = 2,
        normalize: bool = True,
        bias_downsample: bool = False,
    ) -> None:
        super().__init__()
        self.net = resnet18(
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=stem_stride,
            widen_factor=widen_factor,
            feed_forward=False,
            bias_downsample=bias_downsample,
            num_classes=1,  # unused: no fc layer with feed_forward=False
        )
        self.in_channels = int(in_channels)
        self.out_dim = int(self.net.layer4[-1].conv2.out_channels)
        self.normalize = bool(normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` -> ``B x out_dim`` (unit L2 norm when ``normalize``)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            # list(), not tuple(): TorchScript cannot size a tuple built from a shape
            raise ValueError(
                f"ImageEncoder expects B x {self.in_channels} x H x W input, got shape {list(x.shape)}"
            )
        feats = self.net(x)
        return F.normalize(feats, dim=1) if self.normalize else feats


class EncoderPair(nn.Module):
    """Two independent encoders: ``xray`` (radiograph, ``f``) and ``map`` (thickness map, ``g``).

    ``forward(xray, maps)`` returns ``(f(xray), g(maps))``, each ``B x out_dim`` and unit-norm.
    Extra keyword arguments (``widen_factor``, ``stem_stride``, ...) go to both :class:`ImageEncoder`.
    """

    def __init__(self, xray_channels: int = 1, map_channels: int = 1, **encoder_kwargs) -> None:
        super().__init__()
        self.xray = ImageEncoder(in_channels=xray_channels, **encoder_kwargs)
        self.map = ImageEncoder(in_channels=map_channels, **encoder_kwargs)
        self.out_dim = self.xray.out_dim

    def embed_xray(self, x: torch.Tensor) -> torch.Tensor:
        """Radiograph ROI ``B x 1 x H x W`` -> embedding ``B x D``."""
        return self.xray(x)

    def embed_map(self, y: torch.Tensor) -> torch.Tensor:
        """Network-ready thickness map ``B x 1 x H x W`` (mm / 3, NaN -> 0) -> embedding ``B x D``."""
        return self.map(y)

    def forward(self, xray: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_xray(xray), self.embed_map(maps)

    def encoders(self) -> dict[str, nn.Module]:
        """``{"xray": f, "map": g}`` (e.g. for per-encoder gradient clipping)."""
        return {"xray": self.xray, "map": self.map}

    def parameter_groups(self, lr_xray: float = 1e-4, lr_map: float = 1e-5, **group_kwargs) -> list[dict]:
        """Optimiser parameter groups with the paper's learning rates (radiograph 1e-4, map 1e-5)."""
        return [
            {"params": list(self.xray.parameters()), "lr": lr_xray, **group_kwargs},
            {"params": list(self.map.parameters()), "lr": lr_map, **group_kwargs},
        ]


class DualEncoder(DescribedModule, EncoderPair):
    """MRIS-C network: an :class:`EncoderPair` that carries its description in its state dict (module docstring)."""


class MRISSeparate(DescribedModule, nn.Module):
    """MRIS-S: one independent :class:`EncoderPair` per thickness map (default ``("fc", "tc")``).

    Sub-models are reachable as ``model["fc"]`` / ``model["tc"]``. ``forward(xray, maps)`` takes the same
    radiograph batch for every key and a mapping ``{key: B x 1 x H x W}`` of thickness maps, and returns
    ``{key: (xray_embedding, map_embedding)}``.
    """

    def __init__(self, maps: Sequence[str] = MAP_KEYS, **dual_kwargs) -> None:
        super().__init__()
        if len(maps) == 0 or len(set(maps)) != len(maps):
            raise ValueError(f"maps must be non-empty unique keys, got {maps!r}")
        self.keys = tuple(maps)
        self.pairs = nn.ModuleDict({k: EncoderPair(**dual_kwargs) for k in self.keys})
        self.out_dim = self.pairs[self.keys[0]].out_dim

    def __getitem__(self, key: str) -> EncoderPair:
        return self.pairs[key]  # type: ignore[return-value]

    def embed_xray(self, x: torch.Tensor, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Radiograph ``B x 1 x H x W`` -> ``{key: B x D}`` (one radiograph encoder per key)."""
        return {k: self.pairs[k].embed_xray(x) for k in (keys or self.keys)}

    def embed_map(self, maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{key: B x 1 x H x W}`` network-ready maps -> ``{key: B x D}``."""
        unknown = set(maps) - set(self.keys)
        if unknown:
            raise KeyError(f"unknown map keys {sorted(unknown)}; model has {list(self.keys)}")
        return {k: self.pairs[k].embed_map(v) for k, v in maps.items()}

    def forward(
        self, xray: torch.Tensor, maps: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        missing = [k for k in self.keys if k not in maps]
        if missing:
            raise KeyError(f"missing thickness maps for keys {missing}")
        return {k: self.pairs[k](xray, maps[k]) for k in self.keys}

    def encoders(self) -> dict[str, nn.Module]:
        """``{"fc.xray": ..., "fc.map": ..., "tc.xray": ..., "tc.map": ...}``."""
        return {f"{k}.{n}": m for k in self.keys for n, m in self.pairs[k].encoders().items()}

    def parameter_groups(self, lr_xray: float = 1e-4, lr_map: float = 1e-5, **group_kwargs) -> list[dict]:
        """Concatenated :meth:`EncoderPair.parameter_groups` of every key."""
        groups: list[dict] = []
        for k in self.keys:
            groups += self.pairs[k].parameter_groups(lr_xray=lr_xray, lr_map=lr_map, **group_kwargs)
        return groups


class RadiographDualEncoder(DualEncoder):
    """MRIS-C inference / export network: a :class:`DualEncoder` whose ``forward(x)`` is the radiograph
    encoder only.

    ``forward(x)``: radiograph ROI ``B x 1 x H x W`` -> ``f(x)``, ``B x D`` (unit L2 norm). The map encoder
    is kept (same state-dict keys as :class:`DualEncoder`, so training checkpoints load strictly, and
    :meth:`embed_map` still works) but is not called by ``forward``. This is the network of the MRIS bundle's
    ``inference.json`` (``network_def``), verified by ``verify_net_in_out`` and exported by ``ckpt_export``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.xray(x)


class RadiographMRISSeparate(MRISSeparate):
    """MRIS-S inference / export network: an :class:`MRISSeparate` whose ``forward(x)`` runs only the
    radiograph encoders.

    ``forward(x)``: radiograph ROI ``B x 1 x H x W`` -> ``B x (K * D)``: the radiograph embeddings of the
    ``K`` map keys concatenated in ``self.keys`` order (default ``("fc", "tc")``: columns ``0 .. D-1`` =
    ``f_fc(x)``, ``D .. 2D-1`` = ``f_tc(x)``, each block unit L2 norm; the whole row is NOT unit norm).
    Same state-dict keys as :class:`MRISSeparate`; :meth:`embed_xray` still returns ``{key: B x D}``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        embeddings: list[torch.Tensor] = []
        for pair in self.pairs.values():  # insertion order = self.keys
            embeddings.append(pair.xray(x))
        return torch.cat(embeddings, dim=1)
