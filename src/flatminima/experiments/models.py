"""Models for the experiments.

=============  ==============================================  =====================  ====================
name           what                                            ``width``              ``depth``
=============  ==============================================  =====================  ====================
``mlp``        fully connected, ReLU (any input, flattened)    hidden units (256)     hidden layers (2)
``resnet1d``   1-D ResNet: 3 stages of basic blocks, BN        first stage's channels blocks per stage (1)
               (sequences ``(N, L)`` or ``(N, C, L)``)         (32)
``cnn``        small CNN for small images (digits 8x8)         first conv's channels  --
                                                               (32)
``cnn1d``      the MNIST-1D paper's CNN (Greydanus 2020): 3    channels (25)          --
               strided 1-D convolutions, ReLU, linear head
               (sequences ``(N, L)``)
``wrn``        WideResNet-depth-width (Zagoruyko & Komodakis   widen factor k (4)     depth (16): 10, 16,
               2016), pre-activation blocks, for 32x32 images                         22, 28, ...
=============  ==============================================  =====================  ====================

``auto`` picks ``mlp`` for mnist1d, ``cnn`` for digits and ``wrn``
(WRN-16-4) for CIFAR. ``build_model`` draws the initial weights from
torch's global generator: seed it first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError

MODELS = ("auto", "mlp", "resnet1d", "cnn1d", "cnn", "wrn")
AUTO_MODEL = {"mnist1d": "mlp", "digits": "cnn", "cifar10": "wrn", "cifar100": "wrn"}


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock1d(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.short = (
            nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class ResNet1D(nn.Module):
    """A small 1-D ResNet: stem, stages of ``blocks`` basic blocks at widths
    ``w, 2w, 4w`` (strides 1, 2, 2), global average pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, width, 5, 1, 2, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(BasicBlock1d(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = self.stages(self.stem(x))
        return self.head(x.mean(-1))


class ConvBase1d(nn.Module):
    """The small CNN of the MNIST-1D paper (Greydanus 2020, ``ConvBase`` in its
    repository): convolutions of kernel 5, 3, 3, stride 2, padding 1, ReLU,
    and a linear classifier on the flattened features (25 x 5 for the
    40-sample signals). The paper reports about 94% test accuracy on clean
    MNIST-1D."""

    def __init__(self, length: int, num_classes: int, channels: int = 25) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, channels, 5, 2, 1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, 2, 1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, 2, 1), nn.ReLU(),
        )
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.convs(x.view(len(x), 1, -1)).flatten(1))


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, max-pool, linear-ReLU-linear."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        c, h, w = in_shape

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(c, width), *block(width, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.short = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(torch.relu(self.bn2(y))))
        return y + (self.short(o) if self.short is not None else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32x32 images (``depth = 6n + 4``)."""

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        check_wrn(depth, widen)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride=(1 if stage == 0 else 2) if i == 0 else 1, dropout=dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def check_wrn(depth: int, widen: int) -> None:
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"WideResNet depth must be 6n+4 >= 10 (10, 16, 22, 28, ...), got --depth {depth}")
    if widen < 1:
        raise ConfigError(f"WideResNet width (widen factor) must be >= 1, got --width {widen}")


def resolve_model_name(name: str, dataset: str) -> str:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return AUTO_MODEL.get(dataset, "mlp") if name == "auto" else name


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dataset: str = "",
    width: int | None = None,
    depth: int | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a model by name for inputs of ``input_shape`` (without the batch axis)."""
    name = resolve_model_name(name, dataset)
    shape = tuple(int(s) for s in input_shape)
    for label, v in (("--width", width), ("--depth", depth)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{label} must be a positive integer, got {v!r}")
    if dropout and name != "wrn":
        raise ConfigError(f"--dropout is supported by the wrn model only, not {name}")
    if name == "mlp":
        return MLP(math.prod(shape), num_classes, width or 256, 2 if depth is None else depth)
    if name == "resnet1d":
        if len(shape) not in (1, 2):
            raise ConfigError(f"model resnet1d needs 1-D inputs (L or C x L), got inputs of shape {shape}")
        return ResNet1D(1 if len(shape) == 1 else shape[0], num_classes, width or 32, depth or 1)
    if name == "cnn1d":
        if len(shape) != 1 or shape[0] < 8:
            raise ConfigError(f"model cnn1d needs 1-D signals of at least 8 samples (N x L), got inputs of shape {shape}")
        if depth is not None:
            raise ConfigError("model cnn1d has a fixed depth (3 convolutions); --depth applies to mlp, resnet1d and wrn")
        return ConvBase1d(shape[0], num_classes, width or 25)
    if depth is not None and name == "cnn":
        raise ConfigError("model cnn has a fixed depth; --depth applies to mlp, resnet1d and wrn")
    if len(shape) != 3:
        raise ConfigError(f"model {name} needs images (C x H x W), got inputs of shape {shape}")
    if name == "cnn":
        if shape[1] < 4 or shape[2] < 4:
            raise ConfigError(f"model cnn needs images of at least 4x4, got {shape}")
        return SmallCNN(shape, num_classes, width or 32)
    return WideResNet(depth or 16, width or 4, num_classes, in_channels=shape[0], dropout=dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
