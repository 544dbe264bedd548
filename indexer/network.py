"""The torch side of a backbone: a pretrained trunk cut at one stage, preprocessing inside."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .backbone import BackboneError, check_layer, get_spec


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; we say it in one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        # torch's own message is a paragraph about weights_only; the type says enough.
        raise BackboneError(f"{path}: not a PyTorch weights file ({type(exc).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path}: does not hold a state dict of tensors")
    return obj


class FeatureNet(nn.Module):
    """RGB pixels in [0, 255], N x 3 x H x W  ->  feature map of one stage."""

    def __init__(self, trunk: nn.Module, mean, std):
        super().__init__()
        self.trunk = trunk
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x * self.scale - self.shift)


def _lite0(state: dict[str, torch.Tensor], layer: str, path: Path) -> nn.Module:
    import timm

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    if list(state) != list(target):
        # The packaged file uses the original implementation's names
        # (_conv_stem, _blocks.N...), which map one to one, in order.
        if len(state) != len(target) or any(
            a.shape != b.shape for a, b in zip(state.values(), target.values())
        ):
            raise BackboneError(f"{path}: not an EfficientNet-Lite0 state dict")
        state = dict(zip(target, state.values()))
    net.load_state_dict(state)
    parts: list[nn.Module] = [net.conv_stem, net.bn1]
    if layer == "head":
        parts += [*net.blocks, net.conv_head, net.bn2]
    else:
        parts += list(net.blocks[: int(layer.removeprefix("block"))])
    return nn.Sequential(*parts)


def _resnet50(state: dict[str, torch.Tensor], layer: str, path: Path) -> nn.Module:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BackboneError(f"{path}: not a ResNet-50 state dict ({first})") from None
    parts = [net.conv1, net.bn1, net.relu, net.maxpool]
    for i in range(1, int(layer.removeprefix("layer")) + 1):
        parts.append(getattr(net, f"layer{i}"))
    return nn.Sequential(*parts)


def build_trunk(model: str, layer: str | None, weights_file: Path) -> FeatureNet:
    """Build the trunk of ``model`` up to ``layer`` (eval mode, no gradients)."""
    spec = get_spec(model)
    layer = check_layer(spec, layer)
    state = _read_state_dict(weights_file)
    build = _lite0 if spec.name == "efficientnet_lite0" else _resnet50
    net = FeatureNet(build(state, layer, weights_file), spec.mean, spec.std).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
