"""The torch side of a backbone: a pretrained trunk cut at one stage, preprocessing inside."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .backbone import BackboneError, check_layer, get_spec, layer_names


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
    """RGB pixels in [0, 255], N x 3 x H x W  ->  feature map of one stage, or a tuple of them.

    ``stages`` run in order; the outputs of those at ``taps`` (indices) are returned.
    """

    def __init__(self, stages: list[nn.Module], taps: list[int], mean, std):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.taps = taps
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor):
        x = x * self.scale - self.shift
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.taps:
                outs.append(x)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _lite(name: str, state: dict[str, torch.Tensor], path: Path) -> dict[str, nn.Module]:
    """The named stages of an EfficientNet-Lite, in order: stem, block1..block7, head."""
    import timm

    net = timm.create_model(name, pretrained=False)
    target = net.state_dict()
    if list(state) != list(target):
        # The packaged files use the original implementation's names
        # (_conv_stem, _blocks.N...), which map one to one, in order.
        if len(state) != len(target) or any(
            a.shape != b.shape for a, b in zip(state.values(), target.values())
        ):
            pretty = name.replace("efficientnet_lite", "EfficientNet-Lite")
            raise BackboneError(f"{path}: not an {pretty} state dict")
        state = dict(zip(target, state.values()))
    net.load_state_dict(state)
    stages = {"stem": nn.Sequential(net.conv_stem, net.bn1), "": net}
    for i, block in enumerate(net.blocks, 1):
        stages[f"block{i}"] = block
    stages["head"] = nn.Sequential(net.conv_head, net.bn2)
    return stages


def _resnet50(state: dict[str, torch.Tensor], path: Path) -> dict[str, nn.Module]:
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BackboneError(f"{path}: not a ResNet-50 state dict ({first})") from None
    stages = {"stem": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), "": net}
    for i in range(1, 5):
        stages[f"layer{i}"] = getattr(net, f"layer{i}")
    return stages


def build_trunk(model: str, layer: str | None, weights_file: Path) -> FeatureNet:
    """Build the trunk of ``model`` up to the deepest of ``layer``'s stages (eval mode, no gradients)."""
    spec = get_spec(model)
    wanted = layer_names(check_layer(spec, layer))
    state = _read_state_dict(weights_file)
    named = (_resnet50(state, weights_file) if spec.name == "resnet50"
             else _lite(spec.name, state, weights_file))
    whole = named.pop("")
    names = list(named)
    last = max(names.index(n) for n in wanted)
    stages = [named[n] for n in names[:last + 1]]
    net = FeatureNet(stages, [names.index(n) for n in wanted], spec.mean, spec.std).eval()
    # Kept outside the module tree: the trunk shares its stages' parameters, and
    # whole_state() saves them in the layout build_trunk reads.
    net.__dict__["whole"] = whole
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def whole_state(net: FeatureNet) -> dict[str, torch.Tensor]:
    """The state dict of the whole network the trunk was cut from, with its current
    (perhaps fine-tuned) parameters: a weights file that build_trunk reads."""
    return {k: v.detach().cpu().clone() for k, v in net.__dict__["whole"].state_dict().items()}
