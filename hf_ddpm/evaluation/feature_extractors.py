"""The networks behind the metrics, all behind one small interface: uint8 images in, feature vectors out.

A `FeatureExtractor` is a `torch.nn.Module` called on uint8 images (B, C, H, W) with values 0..255, grayscale or
RGB, at any resolution. It returns a dict of float32 tensors: "features" (B, D), the vectors Fréchet distances
and KID compare, and "logits" (B, K) where the network classifies (Inception Score, the digits metric). Its
`name` identifies network, weights and preprocessing (it keys cached reference statistics) and `feature_dim`
is D. Tests and custom metrics inject any module that follows this interface.

    >>> from hf_ddpm.feature_extractors import build_feature_extractor
    >>> inception = build_feature_extractor("inception")           # FID / KID / IS
    >>> out = inception(images_uint8)                              # {"features": (B, 2048), "logits": (B, 1008)}

Extractors and their preprocessing:

* `InceptionV3Features` (FID, KID, IS): the TF-Inception graph of 2015-12-05 that the original FID and IS code
  ran, re-implemented here in torch and loading the state_dict that torch-fidelity publishes
  (`weights-inception-2015-12-05-6726825d.pth`; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` holds the
  same tensors under the same names). Preprocessing is that of the TF graph, as torch-fidelity reproduces it:
  uint8 -> float, TF 1.x bilinear resize to 299x299 (`resize_bilinear_tf1`), (x - 128) / 128. Scores are then
  comparable with torch-fidelity's and with the DDPM paper's (TF) FIDs; clean-fid's "clean" mode (PIL bicubic
  before the network) gives slightly different numbers and is not used for Inception.
* `DINOv2Features` (FD_DINOv2, Stein et al. 2023): `transformers.AutoModel` "facebook/dinov2-base"; PIL bicubic
  (antialiased) resize to 224x224 in float, ImageNet mean/std normalisation, the final-layer-normed CLS token.
* `DigitsFeatures` (the offline digits metric): the project's `DigitsClassifier`; images other than 16x16 are
  resized to 16 with PIL bilinear in float; its penultimate activations (64-d) and 10 logits.

Grayscale images are repeated to three channels for Inception and DINOv2.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from torch import nn

from hf_ddpm.evaluation.digits_classifier import DEFAULT_CONFIG, DEFAULT_WEIGHTS, RESOLUTION, load_digits_classifier

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_SIZE = 299
DINOV2_DEFAULT = "facebook/dinov2-base"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRACTORS = ("inception", "dinov2", "digits")


class MissingWeightsError(FileNotFoundError):
    """A network's weights are not on this machine and cannot be downloaded; the message says what to do."""


class FeatureExtractor(nn.Module):
    """Base class: uint8 (B, C, H, W) -> {"features": float32 (B, feature_dim), optionally "logits": (B, K)}.

    Subclasses set `name` and `feature_dim` and implement `extract`; `forward` checks the input and moves it to
    the module's device.
    """

    name: str
    feature_dim: int

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        device = next(self.parameters()).device
        with torch.no_grad():
            return {key: value.float() for key, value in self.extract(images.to(device)).items()}

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs for uint8 images already on the module's device."""
        raise NotImplementedError


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Grayscale (B, 1, H, W) repeated to three channels; RGB unchanged."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected grayscale or RGB images, got {images.shape[1]} channels")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def pil_resize(images: torch.Tensor, size: int, resample: PIL.Image.Resampling) -> torch.Tensor:
    """Resize each channel of (B, C, H, W) images to size x size with PIL, as 32-bit float images ("F").

    Working in float avoids rounding to 8 bits between resize and network (clean-fid's recipe); PIL filters are
    antialiased when shrinking. Returns float32 on the input's device, values in the input's range (0..255).
    """
    array = images.detach().cpu().float().numpy()
    out = np.empty((*array.shape[:2], size, size), dtype=np.float32)
    for index in np.ndindex(*array.shape[:2]):
        channel = PIL.Image.fromarray(array[index], mode="F")
        out[index] = np.asarray(channel.resize((size, size), resample))
    return torch.from_numpy(out).to(images.device)


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


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Where the FID Inception state_dict is: `weights` if given, else the torch hub cache, downloaded if need be.

    Looks for `INCEPTION_WEIGHTS_FILE` (torch-fidelity) or `PYTORCH_FID_WEIGHTS_FILE` (pytorch-fid) in
    `$TORCH_HOME/hub/checkpoints/` (default ~/.cache/torch/hub/checkpoints/); downloads torch-fidelity's file there
    unless HF_HUB_OFFLINE is set. Raises `MissingWeightsError` naming the file, folder and flag otherwise.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"--inception_weights {weights}: no such file")
        return path
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in (INCEPTION_WEIGHTS_FILE, PYTORCH_FID_WEIGHTS_FILE):
        if (checkpoints / name).is_file():
            return checkpoints / name
    target = checkpoints / INCEPTION_WEIGHTS_FILE
    if not hub_constants.HF_HUB_OFFLINE:
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(target), progress=False)
            return target
        except OSError:  # no network (URLError is an OSError), or an unwritable cache
            pass
    raise MissingWeightsError(
        f"the FID InceptionV3 weights are not on this machine: put {INCEPTION_WEIGHTS_FILE} (from "
        f"{INCEPTION_WEIGHTS_URL}) or pytorch-fid's {PYTORCH_FID_WEIGHTS_FILE} into {checkpoints}/, "
        "or pass --inception_weights PATH"
    )


def load_inception_v3(weights: str | os.PathLike | None = None) -> tuple[InceptionV3, Path]:
    """The FID Inception with its weights (see `inception_weights_path`) in eval mode, and the weights' path.

    The state_dict must have exactly this network's keys (batch norms' `num_batches_tracked` may be absent).
    """
    path = inception_weights_path(weights)
    network = InceptionV3()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = network.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not the FID InceptionV3 state_dict: missing keys {missing[:3]}, "
            f"unexpected keys {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)"
        )
    return network.eval(), path


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class InceptionV3Features(FeatureExtractor):
    """FID/KID features (2048-d pool) and IS logits (1008) of the TF Inception, with the TF graph's preprocessing.

    uint8 -> float -> `resize_bilinear_tf1` to 299x299 -> (x - 128) / 128 -> `InceptionV3`.
    """

    feature_dim = 2048

    def __init__(self, network: InceptionV3, name: str = "inception-2015-12-05"):
        super().__init__()
        self.network = network.eval()
        self.name = name

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None) -> InceptionV3Features:
        """Load the network (see `load_inception_v3`); the name records the weights file's sha256 prefix."""
        network, path = load_inception_v3(weights)
        return cls(network, name=f"inception-2015-12-05-{_file_digest(path)}")

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = resize_bilinear_tf1(_rgb(images).float(), INCEPTION_SIZE)
        features, logits = self.network((x - 128) / 128)
        return {"features": features, "logits": logits}


class DINOv2Features(FeatureExtractor):
    """FD_DINOv2 features: the CLS token (after the final layer norm) of a DINOv2 ViT.

    uint8 -> PIL bicubic (float) resize to `image_size` -> / 255 -> ImageNet mean/std -> `pooler_output`.
    `model` is a Hub id or folder (loaded with `transformers.AutoModel`, offline from the HF cache) or a
    `Dinov2Model` instance.
    """

    def __init__(self, model: str | nn.Module = DINOV2_DEFAULT, image_size: int = 224):
        super().__init__()
        if isinstance(model, str):
            model_id, model = model, _load_dinov2(model)
        else:
            model_id = model.config.name_or_path or "custom"
        self.model = model.eval()
        self.image_size = image_size
        self.feature_dim = model.config.hidden_size
        self.name = f"dinov2-{model_id}-{image_size}px"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pil_resize(_rgb(images), self.image_size, PIL.Image.Resampling.BICUBIC)
        return {"features": self.model(pixel_values=(x - self.mean) / self.std).pooler_output}


def _load_dinov2(model_id: str) -> nn.Module:
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(model_id)
    except OSError as err:
        reason = " ".join(str(err).split())
        raise MissingWeightsError(
            f"cannot load DINOv2 model {model_id!r} ({reason}); download it once where there is internet "
            f"(`hf download {model_id}`, into {hub_constants.HF_HUB_CACHE}) or pass --dinov2_model with a "
            "local folder"
        ) from err


class DigitsFeatures(FeatureExtractor):
    """The digits metric's network: penultimate activations (64-d) and 10 class logits of `DigitsClassifier`.

    Grayscale only; uint8 -> PIL bilinear (float) resize to 16x16 if needed -> / 255 -> classifier.
    """

    def __init__(
        self, weights_path: str | os.PathLike = DEFAULT_WEIGHTS, config_path: str | os.PathLike = DEFAULT_CONFIG
    ):
        super().__init__()
        self.classifier = load_digits_classifier(weights_path, config_path)
        self.feature_dim = self.classifier.feature_dim
        self.name = f"digits-cnn-{_file_digest(Path(weights_path))}"

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] != 1:
            raise ValueError(f"the digits metric needs grayscale (1-channel) images, got {images.shape[1]} channels")
        x = images.float()
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = pil_resize(x, RESOLUTION, PIL.Image.Resampling.BILINEAR)
        features = self.classifier.features(x / 255)
        return {"features": features, "logits": self.classifier.classify(features)}


def build_feature_extractor(
    kind: str, *, inception_weights: str | os.PathLike | None = None, dinov2_model: str = DINOV2_DEFAULT
) -> FeatureExtractor:
    """The extractor called `kind` ("inception", "dinov2" or "digits"), loaded from its default weights."""
    if kind == "inception":
        return InceptionV3Features.from_weights(inception_weights)
    if kind == "dinov2":
        return DINOv2Features(dinov2_model)
    if kind == "digits":
        return DigitsFeatures()
    raise ValueError(f"unknown feature extractor {kind!r}; valid: {', '.join(EXTRACTORS)}")
