"""Stage 2 of segmentation-guided registration: the radiograph (target) segmenter ``S_T`` by CycleGAN domain
adaptation with semantic consistency (Gogoll et al. 2020), as in Demir & Niethammer (MIDL 2024).

Domains: source ``S`` = DXA (images ``x_s`` with the pseudo-labels ``y_s`` of stage 1), target ``T`` = radiograph
(images ``x_t``, no labels). Images ``B x 1 x H x W`` float32 in ``[-1, 1]``
(:func:`pipeline.registration.segmenters.to_model_range`), ``H`` and ``W`` divisible by 4; labels
``B x 1 x H x W`` integers ``0..3`` (0 background, 1 femur, 2 tibia, 3 fibula).

* Generators ``G_ST`` (DXA -> radiograph) and ``G_TS``: :func:`make_generator` (:class:`ResnetGenerator`: 9 residual
  blocks, ``ngf`` 64, instance norm, reflect padding, ``tanh`` output).
* Discriminators ``D_S``, ``D_T``: :func:`make_discriminator` = MONAI ``PatchDiscriminator`` (3 layers, kernel 4,
  instance norm: the 70 x 70 PatchGAN topology); it returns a list of features, the patch scores last.
* Losses, one function each: :func:`lsgan_loss` (least squares against 1 / 0, no activation),
  :func:`cycle_loss` / :func:`identity_loss` (L1), :func:`semantic_consistency_loss` (the four Dice terms).
  Weights (:class:`CycleGANWeights`): GAN 1, cycle 10 per direction, identity 0.5 x 10, semantic 5.
* Segmenters: ``S_S`` (the DXA segmenter of :mod:`pipeline.registration.segmenters`) is frozen (eval mode,
  ``requires_grad=False``; gradients still flow THROUGH it to the generators); ``S_T`` has the same architecture
  and is INITIALISED FROM ``S_S``'s weights (a deep copy, so it keeps the network description and its checkpoints
  load with :func:`pipeline.io.checkpoints.load_network`), then trained jointly with the generators.
* Optimisers: one Adam(2e-4, betas (0.5, 0.999)) for ``G_ST``, ``G_TS``, ``S_T``; one for ``D_S`` and ``D_T``;
  learning rates constant for ``epochs_constant`` epochs then linearly decayed over ``epochs_decay``
  (:func:`linear_decay_factor`, ``LambdaLR``). Paper: batch 1, 150 + 50 epochs. Fakes shown to the
  discriminators come from an :class:`ImagePool` of 50.
* :class:`CycleGANStep`: the iteration function of an ignite ``Engine`` (generator + ``S_T`` step, then
  discriminator step); :func:`train_cyclegan` wires data, engine and schedules and returns ``(S_T, history)``.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.losses import DiceLoss, PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from monai.utils import set_determinism
from torch import nn

from pipeline.nets.describe import DescribedModule, network_factory
from pipeline.registration.segmenters import NUM_CLASSES

__all__ = ["CycleGANNetworks", "CycleGANStep", "CycleGANWeights", "ImagePool", "ResnetGenerator",
           "UnpairedDataset", "cycle_loss", "freeze", "identity_loss", "linear_decay_factor", "lsgan_loss",
           "make_cyclegan_networks", "make_discriminator", "make_generator", "make_lr_scheduler",
           "semantic_consistency_loss", "soft_dice", "train_cyclegan"]

SOURCE, SOURCE_LABEL, TARGET = "source", "source_label", "target"


# ---------------------------------------------------------------------------------------------- networks
class ResnetBlock(nn.Module):
    """``x + [reflect-pad 1, conv 3x3, IN, ReLU, reflect-pad 1, conv 3x3, IN](x)``; shape preserved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=True), nn.InstanceNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=True), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(DescribedModule, nn.Module):
    """CycleGAN's ResNet generator (Johnson et al. 2016; Zhu et al. 2017), 2D.

    ``B x in x H x W`` -> ``B x out x H x W`` in ``[-1, 1]`` (``tanh``); ``H``, ``W`` divisible by
    ``2 ** n_downsampling``. Layers: reflect-pad 3 + conv 7x7 (``ngf``), ``n_downsampling`` stride-2 convs 3x3
    (doubling the width), ``n_blocks`` :class:`ResnetBlock`, as many stride-2 transposed convs 3x3, reflect-pad 3
    + conv 7x7 + ``tanh``; instance norm (no affine) + ReLU after every conv but the last. Conv weights are
    initialised from N(0, 0.02), biases 0 (CycleGAN's default).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9,
                 n_downsampling: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7, bias=True),
                                   nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True)]
        width = ngf
        for _ in range(n_downsampling):
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=True), nn.InstanceNorm2d(2 * width),
                       nn.ReLU(inplace=True)]
            width *= 2
        layers += [ResnetBlock(width) for _ in range(n_blocks)]
        for _ in range(n_downsampling):
            layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                       nn.InstanceNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        for m in self.modules():  # CycleGAN's "normal" initialisation
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@network_factory
def make_generator(in_channels: int = 1, out_channels: int = 1, ngf: int = 64, n_blocks: int = 9,
                   n_downsampling: int = 2) -> ResnetGenerator:
    """A self-describing :class:`ResnetGenerator` (paper: ``ngf`` 64, 9 blocks; tests: ``ngf`` 4, 1 block)."""
    settings = {"in_channels": int(in_channels), "out_channels": int(out_channels), "ngf": int(ngf),
                "n_blocks": int(n_blocks), "n_downsampling": int(n_downsampling)}
    net = ResnetGenerator(**settings)
    return net.describe(make_generator, settings, {"intensity": "[-1, 1] in and out"})


def make_discriminator(in_channels: int = 1, ndf: int = 64, num_layers: int = 3) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` with the 70 x 70 PatchGAN topology for ``num_layers=3``: conv 4x4 stride 2
    (``ndf``, LeakyReLU 0.2, no norm), then ``num_layers`` convs 4x4 with instance norm (strides 2, 2, 1; widths
    x2 each), then a conv 4x4 to 1 channel. ``forward`` returns a list: intermediate features, the patch scores
    (``B x 1 x h x w``, no activation) last."""
    return PatchDiscriminator(spatial_dims=2, channels=int(ndf), in_channels=int(in_channels), out_channels=1,
                              num_layers_d=int(num_layers), kernel_size=4, norm="INSTANCE", bias=True)


@dataclass
class CycleGANNetworks:
    """The six networks: generators ``g_st`` (DXA -> radiograph), ``g_ts``; discriminators ``d_s`` (real DXA?),
    ``d_t`` (real radiograph?); segmenters ``seg_s`` (frozen) and ``seg_t`` (trained)."""

    g_st: nn.Module
    g_ts: nn.Module
    d_s: nn.Module
    d_t: nn.Module
    seg_s: nn.Module
    seg_t: nn.Module

    def to(self, device: Union[str, torch.device]) -> CycleGANNetworks:
        for name in ("g_st", "g_ts", "d_s", "d_t", "seg_s", "seg_t"):
            getattr(self, name).to(device)
        return self


def freeze(network: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (inputs can still receive gradients)."""
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def make_cyclegan_networks(seg_s: nn.Module, ngf: int = 64, n_blocks: int = 9, ndf: int = 64,
                           num_layers_d: int = 3, seed: Optional[int] = None) -> CycleGANNetworks:
    """Generators and discriminators (fresh, seeded by ``seed`` if given), ``seg_s`` frozen IN PLACE, and
    ``seg_t`` = a trainable deep copy of ``seg_s`` (same architecture, initialised from its weights)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    seg_t = copy.deepcopy(seg_s)
    for p in seg_t.parameters():
        p.requires_grad_(True)
    seg_t.train()
    return CycleGANNetworks(g_st=make_generator(ngf=ngf, n_blocks=n_blocks),
                            g_ts=make_generator(ngf=ngf, n_blocks=n_blocks),
                            d_s=make_discriminator(ndf=ndf, num_layers=num_layers_d),
                            d_t=make_discriminator(ndf=ndf, num_layers=num_layers_d),
                            seg_s=freeze(seg_s), seg_t=seg_t)


# ---------------------------------------------------------------------------------------------- losses
_LSGAN = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True, reduction="mean")


def lsgan_loss(prediction: Union[torch.Tensor, list[torch.Tensor]], target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: ``mean((D(x) - 1) ** 2)`` if ``target_is_real`` else ``mean(D(x) ** 2)``.

    ``prediction``: the discriminator's raw patch scores, or a :class:`PatchDiscriminator` output list (its last
    entry is used). MONAI's ``PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)``:
    without that flag MONAI would put a LeakyReLU on the scores. The generator's loss is
    ``lsgan_loss(D(G(x)), True)``."""
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[-1]
    return _LSGAN(prediction, target_is_real=bool(target_is_real), for_discriminator=True)


def cycle_loss(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``mean |G_BA(G_AB(a)) - a|`` (L1, intensities in ``[-1, 1]``); also the identity term's distance."""
    return torch.nn.functional.l1_loss(reconstruction, original)


def identity_loss(same: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``mean |G_AB(b) - b|`` for ``b`` already in domain B (L1)."""
    return torch.nn.functional.l1_loss(same, original)


_DICE_LABELS = DiceLoss(softmax=True, to_onehot_y=True)
_DICE_SOFT = DiceLoss(softmax=False)


def soft_dice(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Dice loss between two segmenters' soft predictions: ``DiceLoss()(softmax(a), softmax(b))`` (background
    included, mean over classes and batch; gradients reach both)."""
    return _DICE_SOFT(torch.softmax(logits_a, 1), torch.softmax(logits_b, 1))


def semantic_consistency_loss(y_s: torch.Tensor, seg_t_fake_t: torch.Tensor, seg_s_rec_s: torch.Tensor,
                              seg_t_real_t: torch.Tensor, seg_s_fake_s: torch.Tensor, seg_t_rec_t: torch.Tensor
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The four semantic-consistency Dice terms (Gogoll et al. 2020), unweighted sum and parts.

    Inputs are logits ``B x 4 x H x W`` of the segmenters, named ``seg_<segmenter>_<image>``:
    ``seg_t_fake_t`` = ``S_T(G_ST(x_s))``, ``seg_s_rec_s`` = ``S_S(G_TS(G_ST(x_s)))``, ``seg_t_real_t`` =
    ``S_T(x_t)``, ``seg_s_fake_s`` = ``S_S(G_TS(x_t))``, ``seg_t_rec_t`` = ``S_T(G_ST(G_TS(x_t)))``; ``y_s``:
    the source labels ``B x 1 x H x W``. Terms (Dice losses, ``monai.losses.DiceLoss``)::

        fake_t = Dice(S_T(G_ST(x_s)), y_s)          rec_s = Dice(S_S(G_TS(G_ST(x_s))), y_s)
        real_t = softDice(S_T(x_t), S_S(G_TS(x_t)))  rec_t = softDice(S_S(G_TS(x_t)), S_T(G_ST(G_TS(x_t))))

    Returns ``(fake_t + rec_s + real_t + rec_t, {"fake_t", "rec_s", "real_t", "rec_t"})``; each term is in
    ``[0, 1]``, ~0 when the predictions agree and are confident."""
    parts = {"fake_t": _DICE_LABELS(seg_t_fake_t, y_s), "rec_s": _DICE_LABELS(seg_s_rec_s, y_s),
             "real_t": soft_dice(seg_t_real_t, seg_s_fake_s), "rec_t": soft_dice(seg_s_fake_s, seg_t_rec_t)}
    return sum(parts.values()), parts


@dataclass
class CycleGANWeights:
    """Loss weights (the paper's): ``gan`` per direction, ``cycle`` per direction, identity =
    ``identity * cycle`` per direction, ``semantic`` on the sum of the four Dice terms."""

    gan: float = 1.0
    cycle: float = 10.0
    identity: float = 0.5
    semantic: float = 5.0


# ---------------------------------------------------------------------------------------------- pool, schedule
class ImagePool:
    """History of generated images shown to a discriminator (Shrivastava et al. 2017; CycleGAN's pool).

    ``query(images)`` (``B x ...``) returns a batch of the same shape: while the pool holds fewer than ``size``
    images each query image is stored and returned; once full, each is, with probability 1/2, swapped with a
    uniformly chosen stored image (the stored one is returned, the new one takes its place), else returned as is.
    ``size=0`` returns the query unchanged. Images are stored detached. Seeded by ``seed``."""

    def __init__(self, size: int = 50, seed: Optional[int] = None) -> None:
        self.size = int(size)
        self.images: list[torch.Tensor] = []
        self._rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return images
        out = []
        for image in images.detach():
            image = image[None]
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self._rng.random() < 0.5:
                k = self._rng.randrange(self.size)
                out.append(self.images[k].clone())
                self.images[k] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)


def linear_decay_factor(epoch: int, epochs_constant: int, epochs_decay: int) -> float:
    """Learning-rate factor at (0-based) ``epoch``: 1 for the first ``epochs_constant`` epochs, then
    ``1 - (epoch + 1 - epochs_constant) / (epochs_decay + 1)`` (CycleGAN's rule: the last decay epoch runs at
    ``1 / (epochs_decay + 1)``); never below 0."""
    return max(0.0, 1.0 - max(0, int(epoch) + 1 - int(epochs_constant)) / float(int(epochs_decay) + 1))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, epochs_constant: int, epochs_decay: int
                      ) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`linear_decay_factor`; call ``step()`` once per epoch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: linear_decay_factor(e, epochs_constant, epochs_decay))


# ---------------------------------------------------------------------------------------------- data
class UnpairedDataset(torch.utils.data.Dataset):
    """Unpaired items ``{"source": 1 x H x W, "source_label": 1 x H x W int64, "target": 1 x H x W}``.

    Length ``max(N_s, N_t)``; item ``i`` holds source ``i % N_s`` and a target drawn at random (seeded;
    the pairing changes between passes), as CycleGAN's unaligned dataset does."""

    def __init__(self, source: torch.Tensor, source_label: torch.Tensor, target: torch.Tensor,
                 seed: int = 0) -> None:
        if len(source) != len(source_label) or len(source) == 0 or len(target) == 0:
            raise ValueError(f"unpaired data needs as many source labels as source images (>0) and >0 targets, "
                             f"got {len(source)} images, {len(source_label)} labels, {len(target)} targets")
        self.source, self.source_label, self.target = source, source_label, target
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return max(len(self.source), len(self.target))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self._rng.integers(len(self.target)))
        return {SOURCE: self.source[i % len(self.source)], SOURCE_LABEL: self.source_label[i % len(self.source)],
                TARGET: self.target[j]}


# ---------------------------------------------------------------------------------------------- training
class CycleGANStep:
    """Iteration function of an ignite ``Engine`` over :class:`UnpairedDataset` batches.

    1. Generators and ``S_T`` (discriminators' gradients off):
       ``w.gan * [lsgan(D_T(G_ST(x_s)), real) + lsgan(D_S(G_TS(x_t)), real)]
       + w.cycle * [L1(G_TS(G_ST(x_s)), x_s) + L1(G_ST(G_TS(x_t)), x_t)]
       + w.identity * w.cycle * [L1(G_ST(x_t), x_t) + L1(G_TS(x_s), x_s)]
       + w.semantic * semantic_consistency_loss(...)``; one step of ``opt_g``.
    2. Discriminators: ``0.5 * [lsgan(D(real), real) + lsgan(D(pool(fake)), fake)]`` each; one step of ``opt_d``.

    Returns the loss parts as floats: ``loss_g``, ``gan``, ``cycle``, ``identity``, ``semantic`` (weighted) and
    the four unweighted Dice terms ``sem_fake_t``, ``sem_rec_s``, ``sem_real_t``, ``sem_rec_t``, ``loss_d``.
    """

    def __init__(self, nets: CycleGANNetworks, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                 weights: Optional[CycleGANWeights] = None, pool_size: int = 50, seed: int = 0,
                 device: Union[str, torch.device] = "cpu") -> None:
        self.nets, self.opt_g, self.opt_d = nets, opt_g, opt_d
        self.w = weights or CycleGANWeights()
        self.pool_s, self.pool_t = ImagePool(pool_size, seed), ImagePool(pool_size, seed + 1)
        self.device = torch.device(device)

    @staticmethod
    def _requires_grad(nets: list[nn.Module], flag: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad_(flag)

    def __call__(self, engine: Engine, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        n, w = self.nets, self.w
        x_s = batch[SOURCE].to(self.device).float()
        y_s = batch[SOURCE_LABEL].to(self.device).long()
        x_t = batch[TARGET].to(self.device).float()
        for net in (n.g_st, n.g_ts, n.d_s, n.d_t, n.seg_t):
            net.train()
        n.seg_s.eval()
        # 1. generators + target segmenter
        self._requires_grad([n.d_s, n.d_t], False)
        self.opt_g.zero_grad(set_to_none=True)
        fake_t = n.g_st(x_s)
        rec_s = n.g_ts(fake_t)
        fake_s = n.g_ts(x_t)
        rec_t = n.g_st(fake_s)
        gan = lsgan_loss(n.d_t(fake_t), True) + lsgan_loss(n.d_s(fake_s), True)
        cyc = cycle_loss(rec_s, x_s) + cycle_loss(rec_t, x_t)
        idt = (identity_loss(n.g_st(x_t), x_t) + identity_loss(n.g_ts(x_s), x_s)
               if w.identity > 0 else torch.zeros((), device=self.device))
        sem, parts = semantic_consistency_loss(y_s, n.seg_t(fake_t), n.seg_s(rec_s), n.seg_t(x_t), n.seg_s(fake_s),
                                               n.seg_t(rec_t))
        loss_g = w.gan * gan + w.cycle * cyc + w.identity * w.cycle * idt + w.semantic * sem
        loss_g.backward()
        self.opt_g.step()
        # 2. discriminators
        self._requires_grad([n.d_s, n.d_t], True)
        self.opt_d.zero_grad(set_to_none=True)
        pooled_t, pooled_s = self.pool_t.query(fake_t.detach()), self.pool_s.query(fake_s.detach())
        loss_d_t = 0.5 * (lsgan_loss(n.d_t(x_t), True) + lsgan_loss(n.d_t(pooled_t), False))
        loss_d_s = 0.5 * (lsgan_loss(n.d_s(x_s), True) + lsgan_loss(n.d_s(pooled_s), False))
        loss_d = loss_d_t + loss_d_s
        loss_d.backward()
        self.opt_d.step()
        out = {"loss_g": loss_g, "gan": w.gan * gan, "cycle": w.cycle * cyc, "identity": w.identity * w.cycle * idt,
               "semantic": w.semantic * sem, "loss_d": loss_d, **{f"sem_{k}": v for k, v in parts.items()}}
        return {k: float(v.detach()) for k, v in out.items()}


@dataclass
class _History:
    parts: dict[str, list[float]] = field(default_factory=dict)

    def add(self, output: Mapping[str, float]) -> None:
        for k, v in output.items():
            self.parts.setdefault(k, []).append(float(v))


def _images(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected N x 1 x H x W or N x H x W, got shape {tuple(t.shape)}")
    return t


def train_cyclegan(source_images: Any, source_labels: Any, target_images: Any, seg_s: nn.Module,
                   networks: Optional[CycleGANNetworks] = None, epochs_constant: int = 150, epochs_decay: int = 50,
                   epoch_length: Optional[int] = None, batch_size: int = 1, lr: float = 2e-4,
                   betas: tuple[float, float] = (0.5, 0.999), ngf: int = 64, n_blocks: int = 9, ndf: int = 64,
                   pool_size: int = 50, weights: Optional[CycleGANWeights] = None, seed: int = 0,
                   device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Train ``S_T`` (and the CycleGAN around it) on unpaired DXA images + labels and radiographs.

    Args:
        source_images, source_labels, target_images: ``N x 1 x H x W`` (or ``N x H x W``) in ``[-1, 1]`` / labels
            ``0..3``; ``H``, ``W`` divisible by 4.
        seg_s: the trained DXA segmenter; frozen in place.
        networks: the networks to train (:func:`make_cyclegan_networks`; the caller keeps access to the
            generators); default: built here with ``ngf``, ``n_blocks``, ``ndf`` from ``seg_s``.
        epochs_constant, epochs_decay: epochs at the full learning rate, then with linear decay (paper 150 + 50);
            the schedule steps once per epoch.
        epoch_length: iterations per epoch (default: ``ceil(max(N_s, N_t) / batch_size)``, one pass).
        batch_size, lr, betas, pool_size, weights: the paper's 1, 2e-4, (0.5, 0.999), 50, :class:`CycleGANWeights`.
        seed: seeds the weights (:func:`monai.utils.set_determinism`, reset afterwards), shuffling, pairing, pools.

    Returns ``(S_T in eval mode, history)``: history ``"parts"`` maps each loss part of :class:`CycleGANStep` to
    its per-iteration values; ``"lr"`` the generator learning rate per epoch (at the epoch's start);
    ``"iterations"``, ``"epochs"``.
    """
    xs, ys, xt = _images(source_images, "source_images").float(), _images(source_labels, "source_labels").long(), \
        _images(target_images, "target_images").float()
    if ys.shape[0] != xs.shape[0] or ys.shape[2:] != xs.shape[2:]:
        raise ValueError(f"source labels {tuple(ys.shape)} do not match source images {tuple(xs.shape)}")
    if int(ys.min()) < 0 or int(ys.max()) >= NUM_CLASSES:
        raise ValueError(f"source labels must lie in 0..{NUM_CLASSES - 1}, got {int(ys.min())}..{int(ys.max())}")
    epochs = int(epochs_constant) + int(epochs_decay)
    if epochs < 1:
        raise ValueError(f"need at least one epoch, got {epochs_constant} + {epochs_decay}")
    set_determinism(seed=int(seed))
    try:
        device = torch.device(device)
        if networks is not None and networks.seg_s is not seg_s:
            raise ValueError("train_cyclegan: networks.seg_s must be the seg_s given (make_cyclegan_networks(seg_s))")
        nets = networks if networks is not None else make_cyclegan_networks(seg_s, ngf=ngf, n_blocks=n_blocks, ndf=ndf)
        nets.to(device)
        opt_g = torch.optim.Adam([*nets.g_st.parameters(), *nets.g_ts.parameters(), *nets.seg_t.parameters()],
                                 lr=float(lr), betas=tuple(betas))
        opt_d = torch.optim.Adam([*nets.d_s.parameters(), *nets.d_t.parameters()], lr=float(lr), betas=tuple(betas))
        schedulers = [make_lr_scheduler(o, epochs_constant, epochs_decay) for o in (opt_g, opt_d)]
        data = UnpairedDataset(xs, ys, xt, seed=int(seed))
        loader = torch.utils.data.DataLoader(data, batch_size=int(batch_size), shuffle=True, num_workers=0,
                                             drop_last=False, generator=torch.Generator().manual_seed(int(seed)))
        length = int(epoch_length) if epoch_length else math.ceil(len(data) / int(batch_size))
        engine = Engine(CycleGANStep(nets, opt_g, opt_d, weights, pool_size, int(seed), device))
        history = _History()
        lrs: list[float] = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.add(e.state.output))
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: lrs.append(float(opt_g.param_groups[0]["lr"])))
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: [s.step() for s in schedulers])
        engine.run(loader, max_epochs=epochs, epoch_length=length)
    finally:
        set_determinism(seed=None)
    return nets.seg_t.eval(), {"parts": history.parts, "lr": lrs, "iterations": int(engine.state.iteration),
                               "epochs": epochs}
