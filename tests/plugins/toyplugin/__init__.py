"""A user's own package, as the tests see it: a sixth compression method with its search space beside it, a
network that takes neither the data's channels nor its classes, and data sources returning tensors or datasets.

``tests/plugins`` is on ``sys.path`` in every test session (``tests/conftest.py``), and
``toyplugin-1.0.dist-info`` beside it declares the package's entry points, as ``pip install`` would:
``toy_magnitude`` (group ``autoslim.methods``), ``toy_net`` (``autoslim.models``) and ``toy_blobs``
(``autoslim.datasets``). So the registry-wide tests cover a method installed from outside autoslim's tree, and
a study file may name each piece by entry point or by import string (``toyplugin.method:Magnitude``).
"""
