"""A compact, ``weights_only``-loadable encoding of sparse weights: a bit mask of the non-zeros plus their values.

Any method whose result is unstructured sparsity (:class:`autoslim.CompressionResult` with ``sparse=True``) is
saved this way by :func:`autoslim.modelfile.save_model`; its ``size_bytes`` is :func:`sparse_size_bytes`.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping

import torch
from torch import nn

FORMAT = "autoslim-bitmask-1"


def sparse_state_dict(model: nn.Module) -> dict:
    """A compact, ``torch.load(..., weights_only=True)``-loadable encoding of ``model.state_dict()``.

    Each floating-point tensor whose encoding is smaller is stored as a bit mask
    of its non-zeros (uint8, 1 bit per element) plus the non-zero values, in
    ``{"shape": [...], "bits": ..., "values": ...}``; the rest stay dense. A
    tensor of density d costs about ``d + 1/32`` of its dense bytes (fp32).
    Restore with :func:`load_sparse_state_dict`.

    >>> layer = nn.Linear(64, 64)
    >>> with torch.no_grad():
    ...     _ = layer.weight[:, 8:].zero_()
    >>> encoded = sparse_state_dict(layer)
    >>> sorted(encoded["tensors"]["weight"]), encoded["tensors"]["weight"]["values"].numel()
    (['bits', 'shape', 'values'], 512)
    """
    tensors: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        nonzero = t != 0
        nnz = int(nonzero.sum())
        if t.is_floating_point() and math.ceil(t.numel() / 8) + nnz * t.element_size() < t.numel() * t.element_size():
            tensors[name] = {"shape": list(t.shape), "bits": _pack_bits(nonzero.flatten()), "values": t[nonzero].clone()}
        else:
            tensors[name] = t.clone()
    return {"format": FORMAT, "tensors": tensors}


def load_sparse_state_dict(model: nn.Module, encoded: Mapping[str, Any]) -> nn.Module:
    """Load an encoding made by :func:`sparse_state_dict` into ``model`` (dense tensors, exact values); return it.

    >>> layer = nn.Linear(64, 64)
    >>> restored = load_sparse_state_dict(nn.Linear(64, 64), sparse_state_dict(layer))
    >>> torch.equal(restored.weight, layer.weight)
    True
    """
    if encoded.get("format") != FORMAT:
        raise ValueError(f"not a sparse state dict of format {FORMAT!r}: {encoded.get('format')!r}")
    state = {}
    for name, item in encoded["tensors"].items():
        if isinstance(item, torch.Tensor):
            state[name] = item
            continue
        mask = _unpack_bits(item["bits"], math.prod(item["shape"]))
        dense = torch.zeros(mask.numel(), dtype=item["values"].dtype)
        dense[mask] = item["values"]
        state[name] = dense.view(item["shape"])
    model.load_state_dict(state)
    return model


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(sparse_state_dict(model))``."""
    buf = io.BytesIO()
    torch.save(sparse_state_dict(model), buf)
    return buf.tell()


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, most significant bit first."""
    padded = torch.nn.functional.pad(flags.to(torch.uint8), (0, -flags.numel() % 8))
    return (padded.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed[:, None] >> _SHIFTS) & 1).flatten()[:n].bool()
