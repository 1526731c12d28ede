"""CIFAR ResNets of He et al. (2016): ResNet-20 and ResNet-56.

Three stages of 16/32/64 channels with ``n`` basic blocks each (depth 6n+2).
Where a stage changes width or resolution the shortcut is a 1x1 convolution
with BatchNorm (option B) rather than the paper's zero-padding (option A), so
that channel removal can follow the residual ties exactly. ResNet-20 has
272,474 parameters with 10 classes (option A: 269,722).
"""

from __future__ import annotations

from torch import nn

from autoslim.models.base import register_model


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()

    def branch(self, x):
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return self.relu2(self.branch(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, n: int, *, in_shape, num_classes, widths=(16, 32, 64)) -> None:
        super().__init__()
        c = in_shape[0]
        self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        planes = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(planes, width, stride))
                planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


@register_model("resnet20")
def resnet20(*, in_shape, num_classes, **kwargs) -> nn.Module:
    """CIFAR ResNet-20 (3 blocks per stage)."""
    return CifarResNet(3, in_shape=in_shape, num_classes=num_classes, **kwargs)


@register_model("resnet56")
def resnet56(*, in_shape, num_classes, **kwargs) -> nn.Module:
    """CIFAR ResNet-56 (9 blocks per stage)."""
    return CifarResNet(9, in_shape=in_shape, num_classes=num_classes, **kwargs)
