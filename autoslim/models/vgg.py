"""VGG-style CIFAR networks (conv-BN-ReLU stacks, global average pool, one linear layer).

The configuration follows the CIFAR VGG used by Network Slimming and the l1/l2
paper. ``width`` scales every layer (0.25 gives a network that trains on a CPU).
Max-pools that would shrink the map below 1x1 are skipped, so any input size works.
"""

from __future__ import annotations

from torch import nn

from autoslim.models.base import register_model

CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, cfg, *, in_shape, num_classes, width: float = 1.0) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            out = max(1, int(round(v * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


def _register(name: str) -> None:
    @register_model(name)
    def factory(*, in_shape, num_classes, width: float = 1.0) -> nn.Module:
        return VGG(CONFIGS[name], in_shape=in_shape, num_classes=num_classes, width=width)

    factory.__doc__ = f"CIFAR {name.upper()} with BatchNorm; ``width`` scales every layer."


for _name in CONFIGS:
    _register(_name)
