"""The networks behind the metrics, all behind one small interface: uint8 images in, feature vectors out.

A `FeatureExtractor` is a `torch.nn.Module` called on uint8 images (B, C, H, W) with values 0..255, grayscale or
RGB, at any resolution. It returns a dict of float32 tensors: "features" (B, D), the vectors Fréchet distances
and KID compare, and "logits" (B, K) where the network classifies (Inception Score, the digits metric). Its
`name` identifies network, weights and preprocessing (it keys cached reference statistics) and `feature_dim`
is D. Tests and custom metrics inject any module that follows this interface.

    >>> from hf_ddpm.evaluation.feature_extractors import build_feature_extractor
    >>> inception = build_feature_extractor("inception")           # FID / KID / IS
    >>> out = inception(images_uint8)                              # {"features": (B, 2048), "logits": (B, 1008)}

Extractors and their preprocessing:

* `InceptionV3Features` (FID, KID, IS): the TF-Inception graph of 2015-12-05 that the original FID and IS code
  ran (`hf_ddpm.evaluation.inception`), with the state_dict that torch-fidelity publishes
  (`weights-inception-2015-12-05-6726825d.pth`; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` holds the
  same tensors under the same names), found by `inception_weights_path`. Preprocessing is that of the TF graph,
  as torch-fidelity reproduces it: uint8 -> float, TF 1.x bilinear resize to 299x299 (`resize_bilinear_tf1`),
  (x - 128) / 128. Scores are then comparable with torch-fidelity's and with the DDPM paper's (TF) FIDs;
  clean-fid's "clean" mode (PIL bicubic before the network) gives slightly different numbers and is not used.
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
from huggingface_hub import constants as hub_constants
from torch import nn

from hf_ddpm.errors import ConfigError, MissingWeightsError
from hf_ddpm.evaluation.digits_classifier import DEFAULT_CONFIG, DEFAULT_WEIGHTS, RESOLUTION, load_digits_classifier
from hf_ddpm.evaluation.inception import INCEPTION_SIZE, InceptionV3, load_inception_v3, resize_bilinear_tf1

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
DINOV2_DEFAULT = "facebook/dinov2-base"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTRACTORS = ("inception", "dinov2", "digits")


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
        """Load the network from `inception_weights_path(weights)`; the name records the file's sha256 prefix."""
        path = inception_weights_path(weights)
        return cls(load_inception_v3(path), name=f"inception-2015-12-05-{_file_digest(path)}")

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
            raise ConfigError(f"the digits metric needs grayscale (1-channel) images, got {images.shape[1]} channels")
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
