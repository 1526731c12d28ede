"""Removal of whole attention heads (autoslim.surgery.heads), checked against masked models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from autoslim.errors import UsageError
from autoslim.surgery import apply_architecture_spec, architecture_spec, channel_groups, remove_channels
from autoslim.surgery.heads import (HeadPrunedMultiheadAttention, head_groups, head_magnitudes, mask_heads,
                                    remove_heads)

SWIN = dict(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5)
ARCHS = {  # small versions of torchvision's ViT, Swin, Swin V2 and MaxViT: (factory, input side)
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                        hidden_dim=32, mlp_dim=64, num_classes=5), 32),
    "swin": (lambda: SwinTransformer(**SWIN), 32),  # 8x8 tokens, 4x4 windows: the shifted blocks mask
    "swin_v2": (lambda: SwinTransformer(**SWIN, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2), 32),
    "maxvit": (lambda: MaxVit(input_size=(28, 28), stem_channels=8, partition_size=7, block_channels=[16],
                              block_layers=[2], head_dim=4, stochastic_depth_prob=0.0, num_classes=5), 28),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(arch: str) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode, its zero-initialised tensors (ViT's class token and head) made random."""
    factory, side = ARCHS[arch]
    model = factory().eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model, torch.randn(2, 3, side, side)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def masked_copy(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` whose removed heads output zero (:func:`mask_heads` of the others)."""
    masked = copy.deepcopy(model)
    mask_heads(masked, {g.name: sorted(set(range(g.num_heads)) - set(keep[g.name])) for g in head_groups(masked)})
    return masked


def test_mask_heads_zeroes_only_the_heads_output_columns():
    model, x = build("swin")
    masked = copy.deepcopy(model)
    mask_heads(masked, {"features.1.0.attn": [1]})  # 2 heads of 8
    w, w0 = masked.features[1][0].attn.proj.weight, model.features[1][0].attn.proj.weight
    assert not w[:, 8:].any() and torch.equal(w[:, :8], w0[:, :8])
    with pytest.raises(UsageError, match="drop: unknown value 'features.1.0'"):
        mask_heads(masked, {"features.1.0": [0]})


def third_removed(n: int) -> list[int]:
    return [i for i in range(n) if i % 3 != 1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_removed_heads_give_the_masked_model(arch):
    model, x = build(arch)
    before = copy.deepcopy(model.state_dict())
    keep = {g.name: third_removed(g.num_heads) for g in head_groups(model)}
    small = remove_heads(model, keep)
    with torch.no_grad():
        ref, out, original = masked_copy(model, keep)(x), small(x), model(x)
    assert rel_error(original, ref) > 1e-2  # the removed heads mattered
    assert rel_error(out, ref) < 1e-5
    assert [g.num_heads for g in head_groups(small)] == [len(k) for k in keep.values()]
    assert [g.head_dim for g in head_groups(small)] == [g.head_dim for g in head_groups(model)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_vit_head_removal_drops_the_hand_counted_parameters():
    model, _ = build("vit")  # width 32, 4 heads of 8, 2 layers; one head removed per layer
    small = remove_heads(model, {g.name: [0, 2, 3] for g in head_groups(model)})
    per_head = 3 * 8 * 32 + 3 * 8 + 32 * 8  # q/k/v rows, their biases, output-projection columns
    assert n_params(model) - n_params(small) == 2 * per_head


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_options(batch_first):
    """Cross-attention with separate key/value widths, masks of every kind, attention weights per head."""
    mha = nn.MultiheadAttention(12, num_heads=3, kdim=5, vdim=7, batch_first=batch_first).eval()
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 5), torch.randn(2, 6, 7)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    pad = torch.zeros(2, 6).masked_fill(torch.tensor([[False] * 5 + [True], [False] * 6]), float("-inf"))
    causal = torch.ones(4, 6, dtype=torch.bool).triu(1)
    bool_pad = pad.isinf()
    float_mask = torch.randn(2 * 3, 4, 6)
    keep = [0, 2]
    small = remove_heads(nn.Sequential(mha), {"0": keep})[0]
    masked = masked_copy(nn.Sequential(mha), {"0": keep})[0]
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": bool_pad}, {"attn_mask": causal},
                       {"attn_mask": causal, "is_causal": True}):
            assert rel_error(small(q, k, v, **kwargs)[0], masked(q, k, v, **kwargs)[0]) < 1e-5
        per_head = mha(q, k, v, attn_mask=float_mask, key_padding_mask=pad, average_attn_weights=False)[1]
        out, weights = small(q, k, v, attn_mask=float_mask.view(2, 3, 4, 6)[:, keep].reshape(4, 4, 6),
                             key_padding_mask=pad, average_attn_weights=False)
    assert torch.allclose(weights, per_head[:, keep], atol=1e-6)
    assert out.shape == q.shape


def test_unbatched_input_and_training_mode():
    mha = nn.MultiheadAttention(8, num_heads=4, dropout=0.5)
    small = remove_heads(nn.Sequential(mha), {"0": [1, 2]})[0]
    x = torch.randn(3, 8)
    out, weights = small.eval()(x, x, x)
    assert out.shape == (3, 8) and weights.shape == (3, 3)
    assert torch.allclose(out, masked_copy(nn.Sequential(mha), {"0": [1, 2]})[0].eval()(x, x, x)[0], atol=1e-6)
    torch.manual_seed(1)
    a = small.train()(x, x, x)[0]
    assert not torch.allclose(a, out)  # attention dropout is active in training mode


@pytest.mark.parametrize("arch", ["vit", "swin_v2", "maxvit"])
def test_spec_rebuilds_a_fresh_model(arch):
    """Heads and MLP widths (channel groups on the token dim) removed -> spec (JSON) -> a fresh model reshaped ->
    strict load -> same outputs."""
    model, x = build(arch)
    small = remove_heads(model, {g.name: third_removed(g.num_heads) for g in head_groups(model)})
    mlps = [g for g in channel_groups(small, example_input=x) if g.channel_dim != 1]
    assert mlps  # the MLP hidden widths are channel groups of the analysis
    small = remove_channels(small, {g.name: third_removed(g.size) for g in mlps}, example_input=x)
    spec = json.loads(json.dumps(architecture_spec(small)))
    assert {name: s["num_heads"] for name, s in spec["heads"].items()} == {
        g.name: g.num_heads for g in head_groups(small)}
    rebuilt = apply_architecture_spec(ARCHS[arch][0](), spec)
    assert str(rebuilt.load_state_dict(small.state_dict())) == "<All keys matched successfully>"
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small(x))


def test_spec_of_an_unpruned_model_changes_nothing():
    model, x = build("swin")
    rebuilt = apply_architecture_spec(ARCHS["swin"][0](), architecture_spec(model))
    rebuilt.load_state_dict(model.state_dict())
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]  # no layer was converted
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


@pytest.mark.parametrize("spec_heads, message", [
    ({"features.1.0.attn": {"type": "ShiftedWindowAttention", "num_heads": 3}}, "must lie in \\[1, 2\\]"),
    ({"features.1.0.attn": {"type": "ShiftedWindowAttention", "num_heads": 0}}, "must lie in \\[1, 2\\]"),
    ({"features.9.attn": {"type": "ShiftedWindowAttention", "num_heads": 1}}, "'features.9.attn'.*not found"),
    ({"features.1.0.attn": {"type": "MultiheadAttention", "num_heads": 1}}, "not found"),
])
def test_bad_spec_is_one_line(spec_heads, message):
    model, _ = build("swin")
    with pytest.raises(UsageError, match=message):
        apply_architecture_spec(model, {**architecture_spec(model), "heads": spec_heads})


@pytest.mark.parametrize("keep, message", [
    ({"nope": [0]}, "keep: unknown value 'nope'; accepted: encoder.layers"),
    ({"encoder.layers.encoder_layer_0.self_attention": []}, "removing all 4 heads"),
    ({"encoder.layers.encoder_layer_0.self_attention": [0, 4]}, r"must lie in \[0, 4\), got 0..4"),
    ({"encoder.layers.encoder_layer_0.self_attention": torch.tensor([1.0])}, "expected head indices"),
])
def test_bad_keep_is_one_line(keep, message):
    model, _ = build("vit")
    with pytest.raises(UsageError, match=message):
        remove_heads(model, keep)


def test_unsupported_attention_is_not_listed():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True), nn.MultiheadAttention(8, 2),
                          nn.MultiheadAttention(8, 2, add_zero_attn=True))
    assert [g.name for g in head_groups(model)] == ["1"]


def test_head_magnitudes_score_a_zero_head_zero():
    model, _ = build("vit")
    masked = masked_copy(model, {g.name: [0, 1, 3] for g in head_groups(model)})
    scores = head_magnitudes(masked)
    assert all(s[2] == 0 and (s[[0, 1, 3]] > 0).all() for s in scores.values())
    pruned = remove_heads(masked, {name: [0, 1, 3] for name in scores})
    assert isinstance(pruned.encoder.layers[0].self_attention, HeadPrunedMultiheadAttention)
    assert all(torch.equal(s[[0, 1, 3]], head_magnitudes(pruned)[name]) for name, s in scores.items())
