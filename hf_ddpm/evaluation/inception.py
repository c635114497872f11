"""The FID Inception network: the TF-Inception graph of 2015-12-05 that the original FID and IS code ran, in torch.

It loads the state_dict that torch-fidelity publishes (`weights-inception-2015-12-05-6726825d.pth`; pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` holds the same tensors under the same names), and `resize_bilinear_tf1` is
the graph's own resize, so scores are comparable with torch-fidelity's and with the DDPM paper's (TF) FIDs. Where
the weights come from on this machine, and the preprocessing around the network, is
`hf_ddpm.evaluation.feature_extractors`' business (`InceptionV3Features`).

    >>> from hf_ddpm.evaluation.inception import load_inception_v3
    >>> network = load_inception_v3("weights-inception-2015-12-05-6726825d.pth")
    >>> pool, logits = network((resize_bilinear_tf1(images.float(), INCEPTION_SIZE) - 128) / 128)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from hf_ddpm.errors import ConfigError

INCEPTION_SIZE = 299  # the network's input resolution


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    r"""TensorFlow 1.x `resize_bilinear(align_corners=False)`, the resize inside the FID Inception graph.

    Output pixel i samples input coordinate s_i = i * (n_in / n_out) (no half-pixel offset, unlike
    `F.interpolate`), computed in float32 as TF does:

        out_i = (1 - f_i) x_{floor(s_i)} + f_i x_{min(floor(s_i) + 1, n_in - 1)},   f_i = s_i - floor(s_i),

    applied separably as out = A_h x A_w^T with the (n_out, n_in) interpolation matrices A.
    """

    def matrix(n_in: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        low = src.floor().long()
        high = (low + 1).clamp(max=n_in - 1)
        frac = src - low
        weights = torch.zeros(size, n_in, dtype=torch.float64)
        rows = torch.arange(size)
        weights.index_put_((rows, low), (1 - frac).double(), accumulate=True)
        weights.index_put_((rows, high), frac.double(), accumulate=True)
        return weights.to(images.dtype).to(images.device)

    return matrix(images.shape[2]) @ images @ matrix(images.shape[3]).T


# --------------------------------------------------------------------------------------------------------------
# InceptionV3, FID variant. Module names give torch-fidelity's / pytorch-fid's state_dict keys, e.g.
# "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch5x5_1.bn.bias", ...,
# "Mixed_7c.branch_pool.conv.weight", "fc.weight" (1008, 2048), "fc.bias" (1008,): the names of torchvision's
# Inception3 without AuxLogits. The TF graph differs from torchvision's network in its pooling branches:
# average pools ignore padded zeros (count_include_pad=False) and the last block max-pools.
# --------------------------------------------------------------------------------------------------------------


class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TF's) and ReLU; state_dict keys conv.*, bn.*."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], **kwargs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 'SAME' average pool that, like TF, averages only over the pixels inside the image."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(in_channels, 64, 1)
        self.branch5x5_1 = _Conv(in_channels, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_tf(x))], 1)


class _ReductionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 480 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _Conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(in_channels, 192, 1)
        self.branch7x7_1 = _Conv(in_channels, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_tf(x))], 1)


class _ReductionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 512 + in_channels channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _Conv(in_channels, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(in_channels, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches -> 2048 channels; `max_pool` for the graph's last block."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(in_channels, 320, 1)
        self.branch3x3_1 = _Conv(in_channels, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(branch3x3),
                self.branch3x3_2b(branch3x3),
                self.branch3x3dbl_3a(branch3x3dbl),
                self.branch3x3dbl_3b(branch3x3dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """The FID Inception network (random weights until a state_dict is loaded; see `load_inception_v3`).

    `forward` takes float (B, 3, 299, 299) already scaled to [-1, 1] and returns the 2048-d pool features and the
    1008 "unbiased" logits pool @ fc.weight^T: the original Inception Score code reads the softmax input without
    the bias (as torch-fidelity's `logits_unbiased`), so IS here matches it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_features=32)
        self.Mixed_5c = _MixedA(256, pool_features=64)
        self.Mixed_5d = _MixedA(288, pool_features=64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, c7=128)
        self.Mixed_6c = _MixedC(768, c7=160)
        self.Mixed_6d = _MixedC(768, c7=160)
        self.Mixed_6e = _MixedC(768, c7=192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, pool @ self.fc.weight.T


def load_inception_v3(path: str | os.PathLike) -> InceptionV3:
    """The FID Inception with the state_dict saved at `path`, in eval mode.

    The state_dict must have exactly this network's keys (batch norms' `num_batches_tracked` may be absent).
    """
    network = InceptionV3()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = network.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConfigError(
            f"{path} is not the FID InceptionV3 state_dict: missing keys {missing[:3]}, "
            f"unexpected keys {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)"
        )
    return network.eval()
