"""Methods a study file may name by mistake: each is refused in one line."""

from toyplugin.method import Magnitude

from autoslim import Method


class NoSpace(Magnitude):
    """No ``no_space.yaml`` beside this module and no ``space`` attribute."""

    name = "no_space"


class Unnamed(Method):
    """No ``name``."""

    def compress(self, model, ctx, params):
        raise AssertionError("never run")


class Abstract(Method):
    """No ``compress``."""

    name = "abstract"
    space = {"params": {}}
