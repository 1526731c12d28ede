import pytest
import torch

from autoslim.models import MODELS, create_model, list_models
from autoslim.registry import named_arguments
from autoslim.errors import UsageError


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_model_builds_for_any_input(name, in_shape):
    """autoslim's own factories take the input shape; an installed one that does not (tests/plugins' toy_net)
    is fitted by model_adapt."""
    takes_shape = "in_shape" in named_arguments(MODELS.get(name), {"in_shape": in_shape})
    model = create_model(name, in_shape=in_shape, num_classes=7,
                         adapt=[] if takes_shape else ["in_channels", "num_classes"]).eval()
    assert model(torch.randn(3, *in_shape)).shape == (3, 7)


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def linear(fin, fout):
    return fin * fout + fout


def test_lenet5_count_matches_the_papers_431080():
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    expected = conv(1, 20, 5) + conv(20, 50, 5) + linear(50 * 4 * 4, 500) + linear(500, 10)
    assert n_params(model) == expected == 431_080


def test_lenet300_100_count():
    model = create_model("lenet300_100", in_shape=(1, 28, 28), num_classes=10)
    assert n_params(model) == linear(784, 300) + linear(300, 100) + linear(100, 10) == 266_610


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet56", 9)])
def test_cifar_resnet_count(name, n):
    bn = lambda c: 2 * c  # noqa: E731
    widths, total, planes = (16, 32, 64), conv(3, 16, 3, bias=False) + bn(16), 16
    for i, w in enumerate(widths):
        for j in range(n):
            total += conv(planes, w, 3, False) + bn(w) + conv(w, w, 3, False) + bn(w)
            if planes != w:
                total += conv(planes, w, 1, False) + bn(w)
            planes = w
    total += linear(64, 10)
    assert n_params(create_model(name, in_shape=(3, 32, 32), num_classes=10)) == total


def test_unknown_model_names_the_accepted_ones():
    with pytest.raises(UsageError, match=r"model: unknown value 'lenet7'; accepted: .*lenet5"):
        create_model("lenet7", in_shape=(1, 28, 28), num_classes=10)
