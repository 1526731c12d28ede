"""Methods, models and data sets share one registry class: the same duplicate rule, the same lookups."""

import pytest

from autoslim.data import DATASETS
from autoslim.errors import UsageError
from autoslim.methods import METHODS
from autoslim.models import MODELS

REGISTRIES = {"methods": (METHODS, "trimming"), "models": (MODELS, "lenet5"), "datasets": (DATASETS, "digits")}


@pytest.mark.parametrize("registry,taken", REGISTRIES.values(), ids=REGISTRIES)
def test_a_taken_name_is_refused_and_keeps_its_first_entry(registry, taken):
    first = registry.get(taken)
    with pytest.raises(ValueError, match=f"{registry.kind} '{taken}' is already registered"):
        registry.add(taken, object())
    assert registry.get(taken) is first


@pytest.mark.parametrize("registry,taken", REGISTRIES.values(), ids=REGISTRIES)
def test_an_unknown_name_is_one_line_naming_the_field_and_every_accepted_name(registry, taken):
    with pytest.raises(UsageError) as e:
        registry.get("no-such-name")
    assert str(e.value) == f"{registry.field}: unknown value 'no-such-name'; accepted: {', '.join(registry.names())}"
    assert taken in registry.names() and "no-such-name" not in registry
