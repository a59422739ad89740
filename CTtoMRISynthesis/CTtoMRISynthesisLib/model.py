"""The U-Net of Dong et al. 2020, built from a config so that a weights file describes its own model.

Five encoder levels of two 3×3 convolutions (the first four followed by 2×2 max-pooling), four decoder
levels of a 2×2 transposed convolution, skip concatenation and two 3×3 convolutions, and a final 1×1
convolution. ``base`` is the width of the first level (the paper uses 64); each level doubles it.

Optional ``lookup_residual`` (not in the paper): the network's output is added to a CT→MRI grey-level
lookup table applied to the centre CT slice, ``out = lookup[round(255·ct)] + unet(x)``. The table (256
values on the 0..1 scale, fit on the training patients by the trainer) is a buffer of the model, so it
travels in the weights file with the tensors; the U-Net then learns only what a pointwise mapping misses.
With ``lookup_sigma`` > 0 the table is indexed by the centre slice blurred by a Gaussian of that many
pixels (and fit the same way), so that CT noise is not turned into MRI speckle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net; stored in every weights file."""

    in_channels: int = 1  # 1 = the CT slice; 3 = the slice and its two neighbours (2.5D)
    out_channels: int = 1  # 1 = the MRI; 2 = the MRI and a raw scale (its uncertainty, see laplace_scale)
    scale: str = "laplace"  # with 2 outputs, what the scale is: "laplace" b (SD √2·b), trained jointly with the
    # image, or "gaussian" σ (SD σ), read from the image features without training them (see _unet)
    base: int = 64  # channels of the first level; the paper's width is 64
    levels: int = 5  # encoder levels, the deepest one being the bottleneck
    norm: str = "batch"  # "batch" or "none" (the paper does not say; batch norm trains faster here)
    lookup_residual: bool = False  # add a CT→MRI grey-level lookup of the centre slice to the output
    lookup_sigma: float = 0.0  # Gaussian blur (pixels) of the centre slice before the lookup; 0 = none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**values)


def _double_conv(in_ch: int, out_ch: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cin in (in_ch, out_ch):
        layers.append(nn.Conv2d(cin, out_ch, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """2D U-Net mapping a (N, in_channels, H, W) CT batch to (N, out_channels, H, W).

    H and W must be divisible by 2**(levels-1) (16 for the paper's 5 levels; 256 is).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if config.norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', not {config.norm!r}")
        if config.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, not {config.scale!r}")
        self.config = config
        widths = [config.base * 2**i for i in range(config.levels)]
        self.encoders = nn.ModuleList()
        cin = config.in_channels
        for w in widths:
            self.encoders.append(_double_conv(cin, w, config.norm))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for w_deep, w in zip(widths[:0:-1], widths[-2::-1]):
            self.ups.append(nn.ConvTranspose2d(w_deep, w, 2, stride=2))
            self.decoders.append(_double_conv(2 * w, w, config.norm))
        self.head = nn.Conv2d(widths[0], config.out_channels, 1)
        if config.out_channels > 1:
            # Start the Laplace scale near what it must learn (b ≈ 0.1, ~25 grey levels) instead of softplus(0)
            # ≈ 0.7: Adam moves a bias by about one learning rate per step, so from 0.7 a few hundred steps
            # leave the scale far too large and nearly flat (measured: b ≈ 0.35 in the head where the error
            # was ≈ 0.13 after 240 steps), and the uncertainty map then says little.
            with torch.no_grad():
                self.head.bias[1:].fill_(INITIAL_RAW_SCALE)
        if config.lookup_residual:
            # Zero until the trainer fits the table; load_state_dict fills it from a weights file.
            self.register_buffer("lookup", torch.zeros(256))

    def set_lookup(self, table) -> None:
        """Set the grey-level table: 256 MRI values (0..1 scale) indexed by CT value 0..255."""
        values = torch.as_tensor(table, dtype=torch.float32).reshape(-1)
        if values.numel() != 256:
            raise ValueError(f"the lookup table needs 256 values, not {values.numel()}")
        self.lookup.copy_(values.to(self.lookup.device))

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.config.levels - 1)

    def _unet(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x)
            if i < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, up(x)], dim=1))
        if self.config.out_channels > 1 and self.config.scale == "gaussian":
            # The Gaussian scale is read from the image features without shaping them (detached): the U-Net is
            # trained by the image loss alone, and the scale learns what error those features go with. (With
            # the gradient flowing back, the likelihood's large early values drowned the image loss: after 5
            # epochs the synthetic MRI was still all zero.)
            image = nn.functional.conv2d(x, self.head.weight[:1], self.head.bias[:1])
            scale = nn.functional.conv2d(x.detach(), self.head.weight[1:], self.head.bias[1:])
            return torch.cat([image, scale], dim=1)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._unet(x)
        if self.config.lookup_residual:
            centre = x[:, self.config.in_channels // 2 : self.config.in_channels // 2 + 1].float()
            centre = gaussian_blur(centre, self.config.lookup_sigma)
            index = (centre * 255.0).round().clamp(0, 255).long()
            table = self.lookup[index].to(out.dtype)
            if out.shape[1] > 1:  # only the MRI channel is a residual; a scale channel stays as predicted
                table = torch.cat([table, torch.zeros_like(out[:, 1:])], dim=1)
            out = out + table
        return out


class UNetEnsemble(nn.Module):
    """Several U-Nets of one architecture (``members``), e.g. trained on different patients.

    ``forward`` returns the members' mean output (a plain drop-in for one U-Net); inference
    (:func:`synthesis.predict_volume`) instead runs each member with its own flip averaging and takes the
    mean as the synthetic MRI and the members' SD as its uncertainty (see :mod:`ensemble`).
    """

    def __init__(self, config: UNetConfig, members: int) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, not {members}")
        self.config = config
        self.members = nn.ModuleList(UNet(config) for _ in range(members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def for_inference(net: nn.Module) -> nn.Module:
    """An eval-mode copy of ``net`` with each batch norm folded into the convolution before it, for prediction.

    In eval mode a batch norm is a per-channel affine map, so it can live in the convolution's weights and bias;
    the copy gives the same output to float rounding (the demo's synthetic MRI moved by at most 1.3e-4 grey levels)
    with one pass over each activation less (`bench_inference.py --quick`, 2 CPU cores: 11.7 → 13.4 slices/s for
    the shipped ensemble at batch 16, one run). ``net`` itself is not changed (a training run goes on with it).
    A network of another kind (a wrapper, e.g. the tests' out-of-memory simulator) is only put in eval mode and run
    as given: what it holds is not known here."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not isinstance(net, (UNet, UNetEnsemble)):
        return net.eval()
    folded = copy.deepcopy(net).eval()
    # the blocks listed first: their children are replaced below, which must not happen under a walk of the tree
    for block in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        layers, kept = list(block.children()), []
        while layers:
            layer = layers.pop(0)
            if isinstance(layer, nn.Conv2d) and layers and isinstance(layers[0], nn.BatchNorm2d):
                layer = fuse_conv_bn_eval(layer, layers.pop(0))
            kept.append(layer)
        for name in list(block._modules):
            del block._modules[name]
        for i, layer in enumerate(kept):
            block.add_module(str(i), layer)
    return folded


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (N, 1, H, W) images in-plane by a Gaussian of ``sigma`` pixels (separable, radius 3σ, edge
    replicated); ``sigma`` 0 returns them unchanged. The trainer fits the lookup table with this same blur."""
    if sigma <= 0:
        return images
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = nn.functional.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1))
    return nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))


#: Smallest Laplace scale (0..1 intensity scale, ≈ 0.25 grey level): keeps log b and 1/b finite where the
#: target is exactly predictable (the zero background).
MIN_LAPLACE_SCALE = 1e-3
SCALES = ("laplace", "gaussian")
#: Variance of the distribution per unit scale²: a Laplace of scale b has variance 2b², a Gaussian σ².
VARIANCE_PER_SCALE2 = {"laplace": 2.0, "gaussian": 1.0}
INITIAL_RAW_SCALE = math.log(math.expm1(0.1))  # softplus⁻¹(0.1)


def laplace_scale(raw: torch.Tensor) -> torch.Tensor:
    """The scale (Laplace b or Gaussian σ) > 0 from the network's raw second output channel (softplus, floored)."""
    return nn.functional.softplus(raw.float()) + MIN_LAPLACE_SCALE


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
