"""Exact removal of whole attention heads.

Heads. Supported attention layers (exact types; a user's subclass with its
own ``forward`` is not listed): ``torch.nn.MultiheadAttention`` (torchvision's
ViT; packed or separate q/k/v projections, without ``add_bias_kv`` or
``add_zero_attn``), torchvision's ``ShiftedWindowAttention`` and
``ShiftedWindowAttentionV2`` (Swin, Swin V2) and MaxViT's
``RelativePositionalMultiHeadAttention``. Removing head ``h`` slices the
``head_dim`` rows of ``h`` out of the query, key and value projections (weights
and biases), the matching input columns out of the output projection, and the
per-head tensors: Swin's relative-position bias table column, Swin V2's
``logit_scale`` entry and the row of the last ``cpb_mlp`` layer, MaxViT's bias
table column. ``num_heads`` shrinks and ``head_dim`` stays; the layer's input
and output width (the model width) is unchanged. Every head is its own softmax,
so the result equals the *masked* model (the head's output-projection columns
zeroed) up to float rounding. The reduced layer's inner width
``num_heads * head_dim`` no longer equals the model width, which the stock
``forward`` of these classes assumes, so a reduced layer becomes an instance of
a subclass (:class:`HeadPrunedMultiheadAttention`, ...) whose ``forward``
computes the same attention with the inner width read from its weights; its
parameter names, hence its ``state_dict`` keys, are the original ones.

The MLP hidden widths of the same models are ordinary channel groups of the
channel analysis (:func:`autoslim.surgery.channel_groups`: a Linear acts on
the last dim of token tensors).

The sizes are recorded by :func:`autoslim.surgery.architecture_spec` (``heads``:
``{layer: {"type", "num_heads"}}``; the Linear widths as ``layers``) and
restored by :func:`autoslim.surgery.apply_architecture_spec`, hence by
:func:`autoslim.load_model`.

Which heads to remove is the caller's choice; :func:`head_magnitudes` is one
magnitude score (no method uses heads yet), :func:`mask_heads` gives the masked
model a removal must equal.

>>> import torch, torchvision
>>> model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=4,
...                                             hidden_dim=16, mlp_dim=32, num_classes=3).eval()
>>> [(g.name, g.num_heads, g.head_dim) for g in head_groups(model)]
[('encoder.layers.encoder_layer_0.self_attention', 4, 4)]
>>> small = remove_heads(model, {"encoder.layers.encoder_layer_0.self_attention": [0, 2]})
>>> small.encoder.layers[0].self_attention.in_proj_weight.shape
torch.Size([24, 16])
>>> masked = copy.deepcopy(model)
>>> mask_heads(masked, {"encoder.layers.encoder_layer_0.self_attention": [1, 3]})
>>> x = torch.randn(2, 3, 32, 32)
>>> torch.allclose(small(x), masked(x), atol=1e-6)
True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from autoslim.errors import UsageError, accepted
from autoslim.surgery.remove import _kept_indices

@dataclass(frozen=True)
class HeadGroup:
    """The heads of one attention layer: ``name`` (its qualified name, the key of ``keep`` in
    :func:`remove_heads`), ``kind`` (the class it was built as), ``num_heads`` and ``head_dim``."""

    name: str
    kind: str
    num_heads: int
    head_dim: int


# --- reduced layers: the same attention with inner width num_heads * head_dim -------------------------------------
class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with heads removed: ``embed_dim`` is the input/output width and the
    projections hold ``num_heads * head_dim`` rows per q/k/v. Same call signature and results as the
    stock layer (``attn_mask`` of shape ``(N * num_heads, L, S)`` counts the remaining heads)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        q, k, v = (t.unsqueeze(0) if unbatched else t if self.batch_first else t.transpose(0, 1)
                   for t in (query, key, value))
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (F.linear(t, w, b).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t, w, b in zip((q, k, v), weights, biases))
        n, length, source = q.shape[0], q.shape[2], k.shape[2]
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask if mask.dim() == 2 else mask.view(n, self.num_heads, length, source))
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).view(n, 1, 1, source)
        attn = F.dropout(scores.softmax(-1), p=self.dropout, training=self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).flatten(2))
        out = out.squeeze(0) if unbatched else out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.mean(1) if average_attn_weights else attn
        return out, weights.squeeze(0) if unbatched else weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: do not attend) as ``-inf``/0 to add to the scores; a float mask as is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class HeadPrunedShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` with heads removed (see :func:`window_attention`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x, self.get_relative_position_bias())


class HeadPrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` with heads removed (see :func:`window_attention`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(self, x, self.get_relative_position_bias(), logit_scale=self.logit_scale)


class HeadPrunedRelativePositionalMultiHeadAttention(RelativePositionalMultiHeadAttention):
    """MaxViT's attention with heads removed: the merge layer reads ``n_heads * head_dim`` features.
    The scores keep the original scale ``feat_dim ** -0.5`` (``scale_factor`` is not changed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        q, k, v = (t.reshape(b, g, p, self.n_heads, self.head_dim).permute(0, 1, 3, 2, 4)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        scores = q @ (k * self.scale_factor).transpose(-2, -1) + self.get_relative_positional_bias()
        out = scores.softmax(-1) @ v
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, self.n_heads * self.head_dim))


def window_attention(m: ShiftedWindowAttention, x: torch.Tensor, position_bias: torch.Tensor, *,
                     logit_scale: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` for ``m``'s weights, the inner width read from ``m.qkv``.

    ``x`` is ``(B, H, W, C)``; the steps (padding to whole windows, cyclic shift
    and its attention mask, Swin V2's cosine attention and zeroed key bias) are
    torchvision's, so an unpruned layer gives the stock result.
    """
    b, h, w, c = x.shape
    ws = m.window_size
    x = F.pad(x, (0, 0, 0, (ws[1] - w % ws[1]) % ws[1], 0, (ws[0] - h % ws[0]) % ws[0]))
    ph, pw = x.shape[1:3]
    shift = [0 if ws[0] >= ph else m.shift_size[0], 0 if ws[1] >= pw else m.shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (ph // ws[0]) * (pw // ws[1])
    x = x.view(b, ph // ws[0], ws[0], pw // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(
        b * windows, ws[0] * ws[1], c)
    inner, heads = m.qkv.out_features // 3, m.num_heads
    bias = m.qkv.bias
    if logit_scale is not None and bias is not None:
        bias = torch.cat([bias[:inner], torch.zeros_like(bias[inner:2 * inner]), bias[2 * inner:]])
    q, k, v = F.linear(x, m.qkv.weight, bias).reshape(x.size(0), x.size(1), 3, heads, inner // heads).permute(
        2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (inner // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + position_bias
    if sum(shift) > 0:
        mask = _shift_mask(x.new_zeros((ph, pw)), ws, shift)
        attn = (attn.view(-1, windows, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)).view(
            -1, heads, x.size(1), x.size(1))
    attn = F.dropout(attn.softmax(-1), p=m.attention_dropout, training=m.training)
    x = F.dropout(m.proj((attn @ v).transpose(1, 2).reshape(x.size(0), x.size(1), inner)), p=m.dropout,
                  training=m.training)
    c = x.size(-1)
    x = x.view(b, ph // ws[0], pw // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _shift_mask(region: torch.Tensor, ws: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """The ``(windows, L, L)`` mask (-100 between tokens of different regions) of a shifted window attention."""
    ph, pw = region.shape
    count = 0
    for hs in ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None)):
        for wsl in ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], wsl[0]:wsl[1]] = count
            count += 1
    region = region.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(-1, ws[0] * ws[1])
    mask = region.unsqueeze(1) - region.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


# --- how each kind of layer is sliced ------------------------------------------------------------------------------
def _rows(heads: Sequence[int], head_dim: int, blocks: int, num_heads: int) -> list[int]:
    """Indices of the rows of ``heads`` in each of ``blocks`` stacked blocks (q, k, v) of ``num_heads`` heads."""
    return [blk * num_heads * head_dim + h * head_dim + j for blk in range(blocks) for h in heads
            for j in range(head_dim)]


def _take(owner: nn.Module, attr: str, dim: int, index: Sequence[int]) -> None:
    """Replace parameter ``owner.attr`` (if any) by its slice ``index`` along ``dim``."""
    t = getattr(owner, attr, None)
    if t is not None:
        setattr(owner, attr, nn.Parameter(t.detach().index_select(dim, torch.tensor(index, device=t.device)),
                                          requires_grad=t.requires_grad))


def _shrink_linear(layer: nn.Linear, *, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None) -> None:
    if rows is not None:
        _take(layer, "weight", 0, rows)
        _take(layer, "bias", 0, rows)
    if cols is not None:
        _take(layer, "weight", 1, cols)
    layer.out_features, layer.in_features = layer.weight.shape


def _slice_mha(m: nn.MultiheadAttention, heads: list[int]) -> None:
    one, three = _rows(heads, m.head_dim, 1, m.num_heads), _rows(heads, m.head_dim, 3, m.num_heads)
    if m._qkv_same_embed_dim:
        _take(m, "in_proj_weight", 0, three)
    for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        _take(m, attr, 0, one)
    _take(m, "in_proj_bias", 0, three)
    _shrink_linear(m.out_proj, cols=one)
    m.num_heads = len(heads)


def _slice_window(m: ShiftedWindowAttention, heads: list[int]) -> None:
    d = m.qkv.out_features // 3 // m.num_heads
    _shrink_linear(m.qkv, rows=_rows(heads, d, 3, m.num_heads))
    _shrink_linear(m.proj, cols=_rows(heads, d, 1, m.num_heads))
    if isinstance(m, ShiftedWindowAttentionV2):
        _take(m, "logit_scale", 0, heads)
        _shrink_linear(m.cpb_mlp[-1], rows=heads)
    else:
        _take(m, "relative_position_bias_table", 1, heads)
    m.num_heads = len(heads)


def _slice_maxvit(m: RelativePositionalMultiHeadAttention, heads: list[int]) -> None:
    _shrink_linear(m.to_qkv, rows=_rows(heads, m.head_dim, 3, m.n_heads))
    _shrink_linear(m.merge, cols=_rows(heads, m.head_dim, 1, m.n_heads))
    _take(m, "relative_position_bias_table", 1, heads)
    m.n_heads = len(heads)


@dataclass(frozen=True)
class _Kind:
    """How one attention class (``base``) is read and sliced, and the class a reduced layer becomes."""

    base: type[nn.Module]
    pruned: type[nn.Module]
    num_heads: Callable[[nn.Module], int]
    head_dim: Callable[[nn.Module], int]
    out_projection: Callable[[nn.Module], nn.Linear]
    slice: Callable[[nn.Module, list[int]], None]


def _window_kind(base: type[nn.Module], pruned: type[nn.Module]) -> _Kind:
    return _Kind(base, pruned, lambda m: m.num_heads, lambda m: m.qkv.out_features // 3 // m.num_heads,
                 lambda m: m.proj, _slice_window)


_KIND_LIST = (
    _Kind(nn.MultiheadAttention, HeadPrunedMultiheadAttention, lambda m: m.num_heads, lambda m: m.head_dim,
          lambda m: m.out_proj, _slice_mha),
    _window_kind(ShiftedWindowAttention, HeadPrunedShiftedWindowAttention),
    _window_kind(ShiftedWindowAttentionV2, HeadPrunedShiftedWindowAttentionV2),
    _Kind(RelativePositionalMultiHeadAttention, HeadPrunedRelativePositionalMultiHeadAttention,
          lambda m: m.n_heads, lambda m: m.head_dim, lambda m: m.merge, _slice_maxvit),
)
_KINDS: dict[type[nn.Module], _Kind] = {cls: k for k in _KIND_LIST for cls in (k.base, k.pruned)}


def _kind(m: nn.Module) -> _Kind | None:
    kind = _KINDS.get(type(m))
    if isinstance(m, nn.MultiheadAttention) and (m.bias_k is not None or m.add_zero_attn):
        return None  # the extra key/value rows are not per head as sliced here
    return kind


# --- public API ----------------------------------------------------------------------------------------------------
def head_groups(model: nn.Module) -> list[HeadGroup]:
    """The attention layers of ``model`` whose heads :func:`remove_heads` can remove, in module order.

    >>> import torchvision
    >>> swin = torchvision.models.swin_t()
    >>> groups = head_groups(swin)
    >>> len(groups), groups[0]
    (12, HeadGroup(name='features.1.0.attn', kind='ShiftedWindowAttention', num_heads=3, head_dim=32))
    """
    return [HeadGroup(name, kind.base.__name__, kind.num_heads(m), kind.head_dim(m))
            for name, m in model.named_modules() if (kind := _kind(m)) is not None]


def head_magnitudes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per layer, the L2 norm of each head's columns of the output projection (a zero head scores 0).

    >>> import torchvision
    >>> scores = head_magnitudes(torchvision.models.swin_t())
    >>> scores["features.1.0.attn"].shape
    torch.Size([3])
    """
    scores = {}
    for g in head_groups(model):
        m = model.get_submodule(g.name)
        w = _KINDS[type(m)].out_projection(m).weight.detach()
        scores[g.name] = w.view(w.shape[0], g.num_heads, g.head_dim).norm(dim=(0, 2))
    return scores


@torch.no_grad()
def mask_heads(model: nn.Module, drop: Mapping[str, Sequence[int]]) -> None:
    """Zero, in place, the output-projection columns of the heads ``drop[layer]``: the heads then contribute
    nothing, and :func:`remove_heads` of the other heads gives the same outputs (the *masked* model).

    >>> mha = nn.MultiheadAttention(4, num_heads=2)
    >>> mask_heads(nn.Sequential(mha), {"0": [1]})
    >>> mha.out_proj.weight[:, 2:].abs().sum().item()
    0.0
    """
    groups = {g.name: g for g in head_groups(model)}
    for name, heads in drop.items():
        if name not in groups:
            raise accepted("drop", name, groups)
        g, m = groups[name], model.get_submodule(name)
        weight = _KINDS[type(m)].out_projection(m).weight
        for h in heads:
            weight[:, h * g.head_dim:(h + 1) * g.head_dim] = 0


def remove_heads(model: nn.Module, keep: Mapping[str, Sequence[int] | torch.Tensor]) -> nn.Module:
    """A copy of ``model`` in which each attention layer ``name`` in ``keep`` has only the heads ``keep[name]``.

    Layers missing from ``keep`` are unchanged; removing every head of a layer is
    refused. ``model`` is not modified. See the module docstring for what is sliced.

    >>> import torch
    >>> mha = nn.MultiheadAttention(8, num_heads=4)
    >>> small = remove_heads(nn.Sequential(mha), {"0": [1, 3]})[0]
    >>> type(small).__name__, small.num_heads, small.head_dim, small.embed_dim
    ('HeadPrunedMultiheadAttention', 2, 2, 8)
    """
    new = copy.deepcopy(model)
    _remove_heads_in_place(new, keep)
    return new


def _remove_heads_in_place(model: nn.Module, keep: Mapping[str, Sequence[int] | torch.Tensor]) -> None:
    groups = {g.name: g for g in head_groups(model)}
    for name, idx in keep.items():
        if name not in groups:
            raise accepted("keep", name, groups)
        heads = sorted(_kept_indices(name, idx, groups[name].num_heads, unit="head"))
        m = model.get_submodule(name)
        kind = _KINDS[type(m)]
        if len(heads) < kind.num_heads(m):
            with torch.no_grad():
                kind.slice(m, heads)
            m.__class__ = kind.pruned  # same attributes and parameters; a forward that reads the inner width


def heads_spec(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer: {"type", "num_heads"}}`` of every attention layer of :func:`head_groups` (JSON-serialisable)."""
    return {g.name: {"type": g.kind, "num_heads": g.num_heads} for g in head_groups(model)}


def apply_heads_spec(model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Reduce the attention layers of a freshly built ``model`` in place to the head counts of ``spec``
    (from :func:`heads_spec`): the first ``num_heads`` heads are kept, to be overwritten by a state_dict."""
    groups = {g.name: g for g in head_groups(model)}
    for name, want in spec.items():
        g = groups.get(name)
        if g is None or g.kind != want.get("type"):
            raise UsageError(f"architecture spec: attention layer '{name}' ({want.get('type')}) not found in "
                             f"{type(model).__name__}")
        if not 1 <= int(want.get("num_heads", 0)) <= g.num_heads:
            raise UsageError(f"architecture spec: heads.{name}.num_heads must lie in [1, {g.num_heads}], "
                             f"got {want.get('num_heads')}")
    _remove_heads_in_place(model, {name: range(int(want["num_heads"])) for name, want in spec.items()})
