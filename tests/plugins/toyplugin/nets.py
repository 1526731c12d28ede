"""A network as users have them: RGB input and 1000 classes, whatever the data (``model_adapt`` fits it)."""

from torch import nn


def make_net(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 1000))


def not_a_model():
    return "a string"
