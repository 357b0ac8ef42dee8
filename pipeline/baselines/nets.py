"""Direct image-to-image synthesis networks (the MRIS paper's baselines): radiograph ROI -> FC and TC maps.

Every generator maps ``B x 1 x S x S`` (radiograph ROI in [0, 1], left-knee orientation) to ``B x 2 x S x S``
(channel 0 = FC, channel 1 = TC, network units = mm / 3 with 0 outside the footprint, rows x columns of
the atlas grid resized to ``S x S``). ``S`` must be divisible by 16.

* ``"unet"``: MONAI :class:`~monai.networks.nets.UNet` (4 stride-2 levels, 2 residual units per level),
  trained with the masked L1 loss.
* ``"pix2pix"``: the same U-Net as generator + a conditional PatchGAN discriminator (MONAI
  :class:`~monai.networks.nets.PatchDiscriminator`, input = radiograph and maps, ``1 + 2`` channels).
* ``"transformer"``: :class:`TransUNet2D`, a TransUNet-like hybrid: a convolutional encoder (MONAI
  ``UnetResBlock``) down to ``S / 16``, a transformer encoder over the ``(S / 16)^2`` patch tokens with
  learned position embeddings (``torch.nn.TransformerEncoder``), and a cascaded up-sampler with skip
  connections (MONAI ``UnetUpBlock``). MONAI's ``UNETR`` / ``SwinUNETR`` would need the optional
  ``einops`` package, which is not a dependency of this project.

Generators describe themselves (:mod:`pipeline.nets.describe`): their checkpoints record the method, the
architecture settings and the radiograph preprocessing (image size, 140 mm ROI, percentile normalisation), so
evaluation and inference rebuild them from the checkpoint (:func:`pipeline.baselines.synthesize.load_generator`).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets import PatchDiscriminator
from torch import nn

from pipeline.conventions import MAP_KEYS
from pipeline.mris.data import radiograph_preprocessing
from pipeline.nets.describe import DescribedModule, network_factory
from pipeline.nets.described import DescribedUNet

__all__ = ["METHODS", "OUT_CHANNELS", "TransUNet2D", "check_method", "make_discriminator", "make_generator"]

#: The direct-synthesis baselines.
METHODS: tuple[str, ...] = ("unet", "pix2pix", "transformer")
#: Output channels of every generator: one per thickness map (``fc``, ``tc``).
OUT_CHANNELS = len(MAP_KEYS)
#: The generators halve the image four times.
SIZE_MULTIPLE = 16
#: Generator settings when neither the user nor a checkpoint gives them (the paper-sized networks).
DEFAULTS = {"method": "unet", "image_size": 256, "base_channels": 64, "hidden_size": 768, "num_layers": 12,
            "num_heads": 12, "mlp_dim": 3072}
#: The generator output, as checkpoints record it.
OUTPUT = "FC, TC thickness maps: mm / 3, 0 outside the footprint, atlas grid resized to image_size"


def check_method(method: str) -> str:
    """Return ``method`` normalised (``"unet"``, ``"pix2pix"``, ``"transformer"``) or raise ``ValueError``."""
    m = str(method).lower().replace("-", "").replace("_", "")
    aliases = {"unet": "unet", "pix2pix": "pix2pix", "transformer": "transformer", "transunet": "transformer"}
    if m not in aliases:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return aliases[m]


class TransUNet2D(nn.Module):
    """TransUNet-like 2D network: CNN encoder -> transformer on ``S/16`` tokens -> cascaded up-sampler.

    Args:
        img_size: input side ``S`` in pixels (divisible by 16; the position embedding is sized for it).
        in_channels, out_channels: input / output channels.
        base_channels: channels of the first level (levels: ``c, 2c, 4c, 8c`` at ``S, S/2, S/4, S/8``).
        hidden_size, num_layers, num_heads, mlp_dim: transformer width, depth, heads, MLP width
            (``hidden_size`` divisible by ``num_heads``).
        norm: MONAI norm name of the convolutional blocks.

    Shapes: ``B x in_channels x S x S`` -> ``B x out_channels x S x S``.
    """

    def __init__(self, img_size: int, in_channels: int = 1, out_channels: int = OUT_CHANNELS,
                 base_channels: int = 64, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, norm: str = "instance") -> None:
        super().__init__()
        if int(img_size) % SIZE_MULTIPLE:
            raise ValueError(f"TransUNet2D needs an image size divisible by {SIZE_MULTIPLE}, got {img_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        c = int(base_channels)
        self.img_size = int(img_size)
        self.grid = self.img_size // SIZE_MULTIPLE
        self.in_channels = int(in_channels)
        self.enc = nn.ModuleList([
            UnetResBlock(2, in_channels, c, 3, 1, norm),
            UnetResBlock(2, c, 2 * c, 3, 2, norm),
            UnetResBlock(2, 2 * c, 4 * c, 3, 2, norm),
            UnetResBlock(2, 4 * c, 8 * c, 3, 2, norm),
        ])
        self.patch_embed = nn.Conv2d(8 * c, hidden_size, kernel_size=2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(hidden_size, num_heads, mlp_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_size)
        self.dec = nn.ModuleList([
            UnetUpBlock(2, hidden_size, 8 * c, 3, 1, 2, norm),
            UnetUpBlock(2, 8 * c, 4 * c, 3, 1, 2, norm),
            UnetUpBlock(2, 4 * c, 2 * c, 3, 1, 2, norm),
            UnetUpBlock(2, 2 * c, c, 3, 1, 2, norm),
        ])
        self.out = UnetOutBlock(2, c, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript-compatible (``ckpt_export``): lists rather than tuple() of a shape, indexed skips
        if x.ndim != 4 or x.shape[1] != self.in_channels or list(x.shape[2:]) != [self.img_size, self.img_size]:
            raise ValueError(f"TransUNet2D expects B x {self.in_channels} x {self.img_size} x {self.img_size}, "
                             f"got {list(x.shape)}")
        skips: list[torch.Tensor] = []
        h = x
        for block in self.enc:
            h = block(h)
            skips.append(h)
        tokens = self.patch_embed(h)  # B x hidden x S/16 x S/16
        b, d, gh, gw = tokens.shape
        t = tokens.flatten(2).transpose(1, 2) + self.pos_embed
        t = self.norm(self.transformer(t))
        h = t.transpose(1, 2).reshape(b, d, gh, gw)
        for i, block in enumerate(self.dec):  # deepest skip first
            h = block(h, skips[len(skips) - 1 - i])
        return self.out(h)


class _DescribedTransUNet2D(DescribedModule, TransUNet2D):
    """:class:`TransUNet2D` that carries its description."""


@network_factory
def make_generator(method: str | None = "unet", image_size: int | None = None, base_channels: int | None = 64,
                   hidden_size: int | None = 768, num_layers: int | None = 12, num_heads: int | None = 12,
                   mlp_dim: int | None = 3072) -> nn.Module:
    """Generator of ``method``: ``B x 1 x S x S`` radiograph -> ``B x 2 x S x S`` FC/TC maps (mm / 3).

    ``base_channels`` = channels of the first level (U-Net levels ``c .. 16c``; TransUNet ``c .. 8c``);
    the transformer arguments only apply to ``"transformer"``. ``None`` means the default (:data:`DEFAULTS`),
    except ``image_size`` of a U-Net, which its weights do not depend on: ``None`` leaves it to the checkpoint.

    The generator describes itself: settings = ``method`` and the arguments its architecture depends on;
    preprocessing = the radiograph chain at ``image_size`` (:func:`pipeline.mris.data.radiograph_preprocessing`).
    """
    method = check_method(DEFAULTS["method"] if method is None else method)
    args = {"base_channels": base_channels, "hidden_size": hidden_size, "num_layers": num_layers,
            "num_heads": num_heads, "mlp_dim": mlp_dim}
    a = {k: int(DEFAULTS[k] if v is None else v) for k, v in args.items()}
    if image_size is None and method == "transformer":
        image_size = DEFAULTS["image_size"]
    if image_size is not None and int(image_size) % SIZE_MULTIPLE:
        raise ValueError(f"image_size must be divisible by {SIZE_MULTIPLE} for the baselines, got {image_size}")
    c = a["base_channels"]
    prep = {**radiograph_preprocessing(image_size), "output": OUTPUT}
    if method in ("unet", "pix2pix"):
        net = DescribedUNet(spatial_dims=2, in_channels=1, out_channels=OUT_CHANNELS,
                             channels=(c, 2 * c, 4 * c, 8 * c, 16 * c), strides=(2, 2, 2, 2), num_res_units=2,
                             norm="instance")
        return net.describe(make_generator, {"method": method, "base_channels": c}, prep)
    net = _DescribedTransUNet2D(int(image_size), 1, OUT_CHANNELS, c, a["hidden_size"], a["num_layers"],
                                a["num_heads"], a["mlp_dim"])
    return net.describe(make_generator, {"method": method, "image_size": int(image_size), **a}, prep)


def make_discriminator(channels: int = 64, num_layers: int = 3) -> nn.Module:
    """Conditional PatchGAN discriminator (pix2pix): input ``B x 3 x S x S`` = radiograph + FC + TC maps;
    MONAI's :class:`PatchDiscriminator` returns a list whose LAST element is the ``B x 1 x s x s`` patch
    logits (no activation)."""
    return PatchDiscriminator(spatial_dims=2, channels=int(channels), in_channels=1 + OUT_CHANNELS,
                              out_channels=1, num_layers_d=int(num_layers))
