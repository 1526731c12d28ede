"""LeNet-5 (Caffe variant) and LeNet-300-100.

LeNet-5 is the network of the Network Trimming and l1/l2 papers: conv 20@5x5,
max-pool, conv 50@5x5, max-pool, fc 500, fc classes; 431,080 parameters on
MNIST. A ReLU follows every conv and the hidden fc layer so that APoZ is
defined for each of them. On inputs smaller than 16 pixels (the 8x8 digits)
the convolutions are zero-padded by 2 so that the spatial size survives.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from autoslim.models.base import register_model


class LeNet5(nn.Module):
    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int,
                 widths: tuple[int, int, int] = (20, 50, 500)) -> None:
        super().__init__()
        c, h, w = in_shape
        pad = 0 if min(h, w) >= 16 else 2
        c1, c2, f1 = widths
        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(c, c1, 5, padding=pad), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 5, padding=pad), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        ))
        for _ in range(2):
            h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"lenet5: input {in_shape} is too small")
        self.classifier = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(), fc1=nn.Linear(c2 * h * w, f1), relu3=nn.ReLU(),
            fc2=nn.Linear(f1, num_classes),
        ))

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet300100(nn.Module):
    def __init__(self, *, in_shape: tuple[int, int, int], num_classes: int,
                 widths: tuple[int, int] = (300, 100)) -> None:
        super().__init__()
        c, h, w = in_shape
        self.classifier = nn.Sequential(OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(c * h * w, widths[0]), relu1=nn.ReLU(),
            fc2=nn.Linear(widths[0], widths[1]), relu2=nn.ReLU(),
            fc3=nn.Linear(widths[1], num_classes),
        ))

    def forward(self, x):
        return self.classifier(x)


@register_model("lenet5")
def lenet5(*, in_shape, num_classes, **kwargs) -> nn.Module:
    """LeNet-5 (conv 20, conv 50, fc 500): 431,080 parameters on MNIST."""
    return LeNet5(in_shape=in_shape, num_classes=num_classes, **kwargs)


@register_model("lenet300_100")
def lenet300_100(*, in_shape, num_classes, **kwargs) -> nn.Module:
    """LeNet-300-100 multilayer perceptron: 266,610 parameters on MNIST."""
    return LeNet300100(in_shape=in_shape, num_classes=num_classes, **kwargs)
