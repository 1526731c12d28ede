"""Dependency-aware physical removal of channels, neurons, residual blocks and attention heads.

The package: :mod:`~autoslim.surgery.analysis` (which channels go together, where
they pass their nonlinearities), :mod:`~autoslim.surgery.remove` (removing
channels and folding what they still contributed), :mod:`~autoslim.surgery.blocks`
(residual blocks), :mod:`~autoslim.surgery.heads` (attention heads) and
:mod:`~autoslim.surgery.spec` (the architecture spec that rebuilds a reduced model).

Implementation choice: our own graph analysis on :mod:`torch.fx`, not
``torch-pruning`` (DepGraph), and so no new dependency. Measured side by side
against the masked model (``benchmarks/bench_surgery.py`` and
``benchmarks/bench_surgery_ops.py``; figures in ``docs/benchmarks.md``): where
torch-pruning works both remove the same channels to the same parameter count
(torch-pruning up to 2.3x faster), but it prunes the wrong channels after a
concatenation followed by pooling and a flatten, cuts through custom modules
that own parameters, LayerNorm and channel-last blocks, and crashes on
ShuffleNet, GroupNorm + PReLU, literal views and weight/spectral norm; nor does
it give the rest the methods need (activation sites, block removal, constant
folding, an architecture spec). So autoslim keeps one engine for every model.

How it works: the model is traced with :mod:`torch.fx` (standard layers are
one call; custom modules are traced into, also those that own parameters,
unless fx cannot trace them: then they stay opaque) and run once on
``example_input``. Every channel gets an id, and every tensor carries, per
dim, the ids laid along that dim (none on batch and spatial dims), so a
channel may sit on dim 1 (convolutions), on the last dim (a Linear on tokens
``(N, L, D)`` or on a channel-last map ``(N, H, W, C)``) or move between them
(``permute``/``transpose``). Ops that tie channels (a residual sum, a depthwise
conv, BatchNorm, an activation, pooling) unite the ids in a union-find; a
concatenation lays ids side by side; a reshape maps them with the dims it
merges or splits (a flatten repeats each id once per spatial position). A
:class:`ChannelGroup` is the set of convolution/Linear layers whose output
channels share the same ids in the same order. Channels that reach the
network output, the model input, a parameter the analysis cannot slice, an
op that mixes them, or a grouped (non-depthwise) conv are fixed and belong to
no group. An op the analysis does not know refuses the whole model, in one
line naming it, if a group's channels reach it. Removal then slices every
layer by the ids it sees, so consumers lose exactly the matching inputs, and
runs the reduced model once, checking every tensor's shape against the
analysis (a mismatch names the op).

What each op does to the channels (exact against the masked model wherever
channels stay removable):

- pass: activations, dropout, pooling and ``F.interpolate``/``nn.Upsample``
  (over spatial dims), ``F.pad`` of spatial dims, elementwise ops,
  ``permute``/``transpose``/``movedim``/``.T``, ``unsqueeze``/``squeeze``.
- sliced: Conv1d/Conv2d/Conv3d (plain or depthwise), Linear on the last dim
  of any input, BatchNorm, PReLU with one weight per channel, and a custom
  module's parameter or buffer that broadcasts against a map along its
  channel dim (ConvNeXt's ``layer_scale`` of shape (C, 1, 1), a user's
  ``nn.Parameter(torch.ones(C))`` viewed as (1, C, 1, 1)); under
  ``weight_norm`` (old hooks or ``parametrizations``) ``g`` and ``v`` are
  sliced and ``g`` rescaled so that the kept weights do not change; under
  ``spectral_norm`` the weight and its ``u`` vector lose output channels.
- blocks: GroupNorm removes only whole groups (the other groups' statistics
  do not change): its channel group gets ``granularity`` = channels per
  GroupNorm group and ``num_groups`` shrinks.
- fixed: channels normalised by a LayerNorm (its statistics over the
  channels change when zeros leave them, so removal is not exact; we chose
  to keep them rather than approximate), by GroupNorm with one group, by a
  spectral-normed layer's input (removing input columns changes sigma: 0.56
  median relative output error over 20 random convs with the stored ``u``,
  ``v``, and the true sigma drops by 17% when 3 of 8 inputs go), softmax or a
  reduction over channels, a padding of the channel dim (the new channels),
  reshapes whose channel dim has a literal size (``view(N, 16, 1, 1)`` cannot
  follow a removal), ``split`` into literal sizes, ``unbind``, and a slice or
  ``narrow`` with literal bounds: the channels before a bound counted from the
  front (after one counted from the back) stay, so the same bound picks the
  same channels; bounds computed at run time or a step fix the whole dim.
- tied: ``chunk`` (and ``split`` by a size computed at run time) ties each
  position of a part to the same position of the others, so that every part
  loses the same positions; a channel shuffle (``nn.ChannelShuffle``,
  ``F.channel_shuffle``, or ShuffleNet's view/transpose/view, where a channel
  dim is split into a literal and a computed part) ties channel ``j`` of
  every shuffle group.

Limits: removable groups are whole producers: a group with one fixed or
repeated channel is not offered, so a producer whose output is sliced with
literal bounds, chunked (ShuffleNet's split ties its two halves), or concatenated with
padding channels into a residual sum keeps all its channels (ShuffleNet keeps
its branches' inner widths removable, ConvNeXt and Swin their MLP widths).
The parts of a concatenation stay separate groups (each consumer loses the
matching slice). Grouped convs, and a depthwise conv after a concatenation,
keep the channels they see (no group). Advanced indexing, ``torch.roll``/
``flip``, ``einsum``/``matmul`` and attention layers, LSTMs,
LocalResponseNorm, other weight parametrizations, functional convolutions or
norms on a custom module's parameters, and custom modules fx cannot trace
refuse the model, naming the op, when a group's channels reach them.

What the methods read off the analysis: every activation call a group's
channels pass through (:attr:`ChannelGroup.sites`: modules called once or
several times, as torchvision's ResNet blocks reuse one ReLU, and functions
such as ``F.relu`` or ``x.relu()``, on whatever dim the channels sit);
:func:`probe` reads the values there, or at any layer's input, on the traced
model; :func:`constant_inputs` what each consumer reads from channels that no
longer depend on the input, folded per consumer by :func:`remove_channels`
where the fold is exact (not a non-zero constant at a zero-padded conv);
:func:`residual_branches` every ``x + f(x)`` of a submodule, removed by
:func:`remove_blocks`. A removal that fails, or whose result does not run, is
refused in one line (:class:`RemovalError`, a UsageError) naming the layer or
op; :func:`check_removal` is that removal as a dry run before training.

>>> import torch
>>> from autoslim.models import create_model
>>> model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
>>> x = torch.randn(2, 1, 28, 28)
>>> [(g.name, g.size) for g in channel_groups(model, example_input=x)]
[('features.conv1', 20), ('features.conv2', 50), ('classifier.fc1', 500)]
>>> small = remove_channels(model, {"features.conv2": range(25)}, example_input=x)
>>> small.classifier.fc1
Linear(in_features=400, out_features=500, bias=True)
"""

from autoslim.surgery.analysis import ActivationSite, ChannelGroup, RemovalError, channel_groups, probe
from autoslim.surgery.blocks import (ResidualBranch, ResidualShortcut, ShortcutPath, check_removal, remove_blocks,
                                     residual_branches)
from autoslim.surgery.count import SizeCount
from autoslim.surgery.heads import HeadGroup, head_groups, head_magnitudes, mask_heads, remove_heads
from autoslim.surgery.remove import (ConstantInputs, constant_inputs, copy_model, remove_channels,
                                     scale_output_channels, scales_exactly, zero_padded)
from autoslim.surgery.spec import apply_architecture_spec, architecture_spec

__all__ = ["ActivationSite", "ChannelGroup", "ConstantInputs", "HeadGroup", "SizeCount", "RemovalError",
           "ResidualBranch", "ResidualShortcut", "ShortcutPath", "apply_architecture_spec", "architecture_spec",
           "channel_groups", "check_removal", "constant_inputs", "copy_model", "head_groups", "head_magnitudes",
           "mask_heads", "probe", "remove_blocks", "remove_channels", "remove_heads", "residual_branches",
           "scale_output_channels", "scales_exactly", "zero_padded"]
