"""The ConvNet of the dataset-distillation literature, and flat-parameter helpers.

ConvNet: `depth` blocks of Conv3x3(width) -> instance norm (GroupNorm with one group per channel,
affine) -> ReLU -> AvgPool 2, then one linear classifier. Depth follows the resolution so the last
feature map is about 4x4 (8 px: 1, 16: 2, 28/32: 3, 64: 4). `features(x)` is the flattened
penultimate embedding (MMD uses it). The network has no buffers, so a flat parameter vector in
`param_names` order is the whole state: trajectory matching uses `flatten_params`,
`unflatten_params` and `functional_forward` (torch.func.functional_call).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call


def convnet_depth(resolution: int) -> int:
    """Blocks so the last feature map is about 4 px: round(log2(resolution / 4)), at least 1."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2 pixels, got {resolution}")
    return max(1, int(round(math.log2(resolution / 4))))


class ConvNet(nn.Module):
    """Conv-InstanceNorm-ReLU-AvgPool x depth, then Linear. Input [B, C, H, W] -> logits [B, classes].

    The standard evaluation network of dataset distillation, so accuracies of networks trained on
    `.d3` files compare with the literature's. For a file: `ConvNet(C, num_classes, (H, W))` with
    `(C, H, W) = d3.metadata.image_shape`.

    Args:
        in_channels: C of the input images.
        num_classes: outputs (logits) per image.
        image_size: (H, W), or one int for square images; sets the default depth and the size of
            the final linear layer.
        width: channels of every convolution (128 in the literature).
        depth: blocks (default: `convnet_depth(min(H, W))`, so the last feature map is about 4 px).
        norm: "instance" (GroupNorm with one group per channel, affine) or "none".
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int] | int,
                 width: int = 128, depth: Optional[int] = None, norm: str = "instance") -> None:
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.depth = depth if depth is not None else convnet_depth(min(h, w))
        if norm not in ("instance", "none"):
            raise ValueError(f"norm must be 'instance' or 'none', got {norm!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(self.depth):
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            channels = width
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"depth {self.depth} pools {image_size} px below 1 px; use a smaller depth")
        self.features_net = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
                       "width": width, "depth": self.depth, "norm": norm}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding [B, feature_dim]."""
        return self.features_net(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.features(x))


def init_params(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise `model` from `generator` (PyTorch's default init, drawn reproducibly).

    Conv/Linear: kaiming-uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) biases; norms:
    weight 1, bias 0, running statistics reset. Returns the model.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
                if hasattr(m, "reset_running_stats") and getattr(m, "track_running_stats", False):
                    m.reset_running_stats()
    return model


def param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in the fixed order flat vectors use."""
    return [n for n, _ in model.named_parameters()]


def param_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shape of every parameter, in `param_names` order."""
    return {n: p.shape for n, p in model.named_parameters()}


def num_params(model: nn.Module) -> int:
    """Number of scalars in the flat parameter vector."""
    return sum(p.numel() for p in model.parameters())


def flatten_params(params: nn.Module | Mapping[str, torch.Tensor],
                   names: Optional[Iterable[str]] = None) -> torch.Tensor:
    """One flat vector [P] of parameters in `param_names` order (differentiable)."""
    if isinstance(params, nn.Module):
        named = dict(params.named_parameters())
    else:
        named = dict(params)
    order = list(names) if names is not None else list(named)
    return torch.cat([named[n].reshape(-1) for n in order])


def unflatten_params(flat: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Split a flat vector into named tensors (views, so gradients flow back to `flat`)."""
    total = sum(math.prod(s) for s in shapes.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat parameter vector has {flat.numel()} values, the model needs {total}")
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].view(shape)
        offset += n
    return out


def functional_forward(model: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` with its parameters taken from the flat vector `flat` (buffers from the model)."""
    params = unflatten_params(flat, param_shapes(model))
    buffers = dict(model.named_buffers())
    return functional_call(model, {**params, **buffers}, (x,))


def load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a flat vector into `model`'s parameters in place; returns the model."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), unflatten_params(flat.detach(), param_shapes(model)).values()):
            p.copy_(v)
    return model
