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
    assert str(e.value) == (f"{registry.field}: unknown value 'no-such-name'; accepted: {', '.join(registry.names())}"
                            ", or an import string 'package.module:name'")
    assert taken in registry.names() and "no-such-name" not in registry


@pytest.mark.parametrize("registry,taken", REGISTRIES.values(), ids=REGISTRIES)
def test_an_import_string_that_cannot_be_had_is_one_line_saying_why(registry, taken):
    for spec, why in [("no_such_pkg.nets:make", "module 'no_such_pkg' not found"),
                      ("os.path:no_such_name", "module 'os.path' has no attribute 'no_such_name'"),
                      ("math:pi", "expected a")]:
        with pytest.raises(UsageError) as e:
            registry.get(spec)
        assert str(e.value).startswith(f"{registry.field}: '{spec}'") and why in str(e.value), str(e.value)


def test_an_installed_entry_point_is_found_by_name(tmp_path, monkeypatch):
    """A package that declares ``[autoslim.models] tiny = tinypkg:make`` is found by that name, no import needed."""
    (tmp_path / "tinypkg.py").write_text("def make(**kwargs):\n    return 'tiny model'\n")
    dist = tmp_path / "tinypkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[autoslim.models]\ntiny = tinypkg:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny" in MODELS and "tiny" in MODELS.names()
    assert MODELS.get("tiny")() == "tiny model"
