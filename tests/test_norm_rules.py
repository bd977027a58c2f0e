"""Each norm rule against exact per-example gradients from torch.func (float64 where it keeps the check clean)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_gns.sources.rules import (
    conv,
    embedding,
    get_call_rule,
    get_norm_rule,
    linear,
    normalization,
    register_norm_rule,
    registry,
)
from lightning_gns.sources.rules.attention import multihead_attention_sq_norm
from lightning_gns.sources.rules.conv import conv_sq_norm, unfold_patches
from lightning_gns.sources.rules.embedding import embedding_sq_norm
from lightning_gns.sources.rules.fallback import batch_layout, per_example_grads, sq_norm_of_grads
from lightning_gns.sources.rules.linear import linear_sq_norm, sum_outer_sq_norm
from lightning_gns.sources.rules.normalization import (
    batch_norm_sq_norm,
    group_norm_sq_norm,
    instance_norm_sq_norm,
    layer_norm_sq_norm,
    rms_norm_sq_norm,
)
from tests.helpers.per_example import (
    layer_sq_norms_by_backward,
    layer_sq_norms_by_vmap,
    random_weights,
    reduction_factor,
)

RTOL = 1e-4
HYPOTHESIS = settings(deadline=None, max_examples=20)


def grad_output_of(layer: nn.Module, inputs: Tensor, reduction: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The output gradient that a real backward hands the layer, and its per-example weights.

    The loss is Σ_i <out_i, r_i> (sum) or its mean over the N examples; the truth for the
    mean is the sum's per-example norm times 1/N².
    """
    out = layer(inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    per_example = (out * weights).flatten(1).sum(1)
    loss = per_example.sum() if reduction == "sum" else per_example.mean()
    (grad_output,) = torch.autograd.grad(loss, out)
    return grad_output, weights


def check_rule(layer: nn.Module, inputs: Tensor, reduction: str, truth: str = "vmap", weighted: bool = False) -> None:
    """The rule against exact per-example gradients; ``weighted``: entrywise weights (a preconditioner's P²)."""
    grad_output, output_weights = grad_output_of(layer, inputs, reduction)
    rule = get_norm_rule(layer)
    assert rule is not None
    sq_weights = random_weights(layer) if weighted else None
    got = rule(layer, (inputs,), grad_output, weights=sq_weights) if weighted else rule(layer, (inputs,), grad_output)
    exact = layer_sq_norms_by_vmap if truth == "vmap" else layer_sq_norms_by_backward
    expected = exact(layer, inputs, output_weights, sq_weights) * reduction_factor(inputs.shape[0], reduction)
    assert got.shape == (inputs.shape[0],)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=1e-12)


# ---------------------------------------------------------------------- Linear


@HYPOTHESIS
@given(
    batch=st.integers(1, 5),
    in_features=st.integers(1, 7),
    out_features=st.integers(1, 7),
    bias=st.booleans(),
    sequence=st.sampled_from([(), (1,), (3,), (9,), (2, 3)]),
    reduction=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
)
def test_linear_matches_exact(batch, in_features, out_features, bias, sequence, reduction, weighted):
    torch.manual_seed(batch * 100 + in_features)
    layer = nn.Linear(in_features, out_features, bias=bias).double()
    check_rule(layer, torch.randn(batch, *sequence, in_features, dtype=torch.float64), reduction, weighted=weighted)


@pytest.mark.parametrize(
    ("steps", "in_features", "out_features"),
    [(2, 32, 32), (40, 3, 4)],
    ids=["gram", "materialised"],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_both_branches_in_float32(steps, in_features, out_features, weighted):
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    check_rule(layer, torch.randn(4, steps, in_features), "sum", weighted=weighted)


@pytest.mark.parametrize("shape", [(6, 5, 3, 4), (6, 1, 3, 4)], ids=["sequence", "one_position"])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_weighted_sum_outer_sq_norm_with_blocks_of_rows(monkeypatch, shape, groups):
    batch, steps, out_features, in_features = shape
    g, a = torch.randn(batch, steps, out_features, dtype=torch.float64), torch.randn(batch, steps, in_features)
    a = a.double()
    weight = torch.rand(groups, out_features, in_features, dtype=torch.float64)
    per_example = torch.einsum("ntl,ntk->nlk", g, a)
    expected = (per_example.square() * weight.repeat(batch // groups, 1, 1)).sum((1, 2))
    torch.testing.assert_close(sum_outer_sq_norm(g, a, weight), expected)
    monkeypatch.setattr(linear, "_CHUNK_ELEMENTS", 20)  # chunks of whole blocks of rows
    torch.testing.assert_close(sum_outer_sq_norm(g, a, weight), expected)


def test_sum_outer_sq_norm_branches_agree():
    torch.manual_seed(0)
    g, a = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 6, dtype=torch.float64)
    materialised = torch.einsum("ntl,ntk->nlk", g, a).square().sum((1, 2))
    torch.testing.assert_close(sum_outer_sq_norm(g, a), materialised)  # T(K+L) = 50 >= KL = 24
    g, a = torch.randn(3, 2, 9, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    gram = torch.einsum("ntl,ntk->nlk", g, a).square().sum((1, 2))
    torch.testing.assert_close(sum_outer_sq_norm(g, a), gram)  # T(K+L) = 34 < KL = 72


@pytest.mark.parametrize("shape", [(7, 5, 3, 4), (7, 2, 9, 8)], ids=["materialised", "gram"])
def test_sum_outer_sq_norm_in_chunks(monkeypatch, shape):
    batch, steps, out_features, in_features = shape
    g, a = torch.randn(batch, steps, out_features), torch.randn(batch, steps, in_features)
    whole = sum_outer_sq_norm(g, a)
    monkeypatch.setattr(linear, "_CHUNK_ELEMENTS", 40)  # a few examples per chunk, one chunk ragged
    torch.testing.assert_close(sum_outer_sq_norm(g, a), whole)


def test_linear_subclass_and_frozen_parts():
    torch.manual_seed(0)
    layer = NonDynamicallyQuantizableLinear(4, 3).double()
    check_rule(layer, torch.randn(5, 2, 4, dtype=torch.float64), "sum")
    layer.weight.requires_grad_(False)
    check_rule(layer, torch.randn(5, 2, 4, dtype=torch.float64), "mean")  # bias only
    layer.bias.requires_grad_(False)
    layer.weight.requires_grad_(True)
    check_rule(layer, torch.randn(5, 4, dtype=torch.float64), "sum")  # weight only


def test_linear_refuses_unbatched_input():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="batch dimension"):
        linear_sq_norm(layer, (torch.ones(3),), torch.ones(2))


# ---------------------------------------------------------------------- Conv


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@settings(deadline=None, max_examples=60)  # three paths times the geometry
@given(
    dims=st.sampled_from([1, 2, 3]),
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    in_per_group=st.sampled_from([1, 2, 9]),
    out_per_group=st.sampled_from([1, 2, 17]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same", "valid"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
    path=st.sampled_from(["auto", "grouped", "unfolded"]),
    weighted=st.booleans(),
)
def test_conv_matches_exact(
    dims,
    batch,
    groups,
    in_per_group,
    out_per_group,
    kernel,
    stride,
    dilation,
    padding,
    padding_mode,
    bias,
    reduction,
    path,
    weighted,
):
    if padding == "same":
        stride = 1  # PyTorch refuses padding="same" with strides
    torch.manual_seed(dims * 10 + kernel)
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    size = 6 if dims < 3 else 5
    layer = conv_cls(
        in_per_group * groups,
        out_per_group * groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
    ).double()
    inputs = torch.randn(batch, in_per_group * groups, *(size,) * dims, dtype=torch.float64)
    # "auto" takes the path the shapes choose (all three occur over the drawn shapes); the others force one.
    forced = mock.patch.object(conv, "_weight_path", return_value=path) if path != "auto" else contextlib.nullcontext()
    with forced:
        check_rule(layer, inputs, reduction, weighted=weighted)


@pytest.mark.parametrize(
    ("layer", "size", "path"),
    [
        (nn.Conv2d(3, 32, 3, padding=1), 32, "unfolded"),  # an RGB first layer: 3 channels are too few to group
        (nn.Conv2d(32, 64, 3, stride=2, padding=1), 32, "grouped"),
        (nn.Conv2d(64, 64, 3, stride=2, padding=1), 16, "grouped"),
        (nn.Conv2d(128, 128, 3, padding=1), 8, "gram"),  # 64 positions against 1152 x 128 weights
        (nn.Conv2d(4, 8, 3, padding=1, groups=4), 8, "unfolded"),  # one channel per group
    ],
)
def test_conv_path_choice_and_float32(layer, size, path):
    torch.manual_seed(0)
    inputs = torch.randn(3, layer.in_channels, size, size)
    grad_output, _ = grad_output_of(layer, inputs, "sum")
    assert conv._weight_path(layer, inputs, grad_output) == path
    check_rule(layer, inputs, "sum")


@pytest.mark.parametrize("path", ["grouped", "unfolded"])
def test_conv_in_chunks(monkeypatch, path):
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    inputs = torch.randn(7, 8, 5, 5, dtype=torch.float64)
    grad_output, _ = grad_output_of(layer, inputs, "sum")
    monkeypatch.setattr(conv, "_weight_path", lambda *_: path)
    whole = conv_sq_norm(layer, (inputs,), grad_output)
    monkeypatch.setattr(conv, "_CHUNK_ELEMENTS", 5400)  # 3 examples of 72 x 25 patches per chunk: 3, 3, 1
    monkeypatch.setattr(conv, "_GRAD_CHUNK_ELEMENTS", 500)  # 2 examples of 216 weights per chunk: 2, 2, 2, 1
    torch.testing.assert_close(conv_sq_norm(layer, (inputs,), grad_output), whole)


def test_per_example_weight_grads_match_exact():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding="valid", dilation=(1, 2), groups=2, padding_mode="reflect")
    inputs, grad_output = torch.randn(3, 4, 9, 8), torch.randn(3, 6, 4, 6)
    expected = torch.stack(
        [torch.autograd.grad(layer(inputs[i : i + 1]), layer.weight, grad_output[i : i + 1])[0] for i in range(3)]
    )
    torch.testing.assert_close(conv.per_example_weight_grads(layer, inputs, grad_output), expected)


@pytest.mark.parametrize("weighted", [False, True])
def test_conv2d_in_float32_with_uneven_shapes(weighted):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3)
    check_rule(layer, torch.randn(4, 3, 9, 7), "sum", weighted=weighted)


def test_weighted_conv_in_several_chunks(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(conv, "_CHUNK_ELEMENTS", 50)  # one example per chunk
    monkeypatch.setattr(linear, "_CHUNK_ELEMENTS", 12)  # and the kernel splits its rows (whole groups) again
    layer = nn.Conv1d(4, 6, 3, groups=2).double()
    check_rule(layer, torch.randn(5, 4, 7, dtype=torch.float64), "mean", weighted=True)


def test_unfold_matches_torch_unfold():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(2, 3, 8, 7)
    expected = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    torch.testing.assert_close(unfold_patches(conv, x), expected)


def test_conv_refuses_unbatched_input_and_other_layers():
    conv = nn.Conv1d(1, 1, 2)
    with pytest.raises(ValueError, match="batch dimension"):
        conv_sq_norm(conv, (torch.ones(1, 4),), torch.ones(1, 3))
    with pytest.raises(TypeError, match="convolution"):
        conv_sq_norm(nn.Linear(2, 2), (torch.ones(1, 2),), torch.ones(1, 2))


# ---------------------------------------------------------------------- Embedding


@HYPOTHESIS
@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 9),
    vocab=st.integers(1, 6),
    padding_idx=st.sampled_from([None, 0, 2]),
    scale_grad_by_freq=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    gram=st.booleans(),
)
def test_embedding_matches_exact(batch, steps, vocab, padding_idx, scale_grad_by_freq, reduction, weighted, gram):
    # Both forms, whatever the length: the Gram form over positions and the sorted scatter.
    with mock.patch.object(embedding, "_GRAM_MAX_STEPS", 10**6 if gram else 0):
        check_embedding(batch, steps, vocab, padding_idx, scale_grad_by_freq, reduction, weighted)


def check_embedding(batch, steps, vocab, padding_idx, scale_grad_by_freq, reduction, weighted):
    if padding_idx is not None and padding_idx >= vocab:
        padding_idx = None
    torch.manual_seed(steps)
    layer = nn.Embedding(vocab, 3, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq).double()
    ids = torch.randint(0, vocab, (batch, steps))  # a small vocab forces repeats within an example
    grad_output, weights = grad_output_of(layer, ids, reduction)
    sq_weights = random_weights(layer) if weighted else None
    got = embedding_sq_norm(layer, (ids,), grad_output, weights=sq_weights)
    if scale_grad_by_freq:
        # The frequency scaling counts ids over the whole batch, which a one-example vmap cannot see:
        # the truth is the gradient of the batched loss restricted to example i's terms.
        sq_weight = 1.0 if sq_weights is None else sq_weights["weight"]
        expected = torch.stack(
            [
                (torch.autograd.grad((layer(ids) * weights)[i].sum(), layer.weight)[0].square() * sq_weight).sum()
                for i in range(batch)
            ]
        )
    else:
        expected = layer_sq_norms_by_vmap(layer, ids, weights, sq_weights)
    torch.testing.assert_close(got.double(), expected * reduction_factor(batch, reduction), rtol=RTOL, atol=1e-12)


def test_embedding_repeated_ids_are_summed_before_squaring():
    layer = nn.Embedding(4, 2)
    ids = torch.tensor([[3, 1, 3, 3]])
    grad_output = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 1.0]]])
    # row 3 gets (2, 2): 8; row 1 gets (0, 2): 4
    torch.testing.assert_close(embedding_sq_norm(layer, (ids,), grad_output), torch.tensor([12.0]))


def test_embedding_padding_row_gets_nothing_and_frozen_gives_zero():
    layer = nn.Embedding(4, 2, padding_idx=0)
    ids = torch.tensor([[0, 0, 1]])
    torch.testing.assert_close(embedding_sq_norm(layer, (ids,), torch.ones(1, 3, 2)), torch.tensor([2.0]))
    layer.weight.requires_grad_(False)
    torch.testing.assert_close(embedding_sq_norm(layer, (ids,), torch.ones(1, 3, 2)), torch.tensor([0.0]))


# ---------------------------------------------------------------------- normalisation layers


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.LayerNorm(5), (4, 5)),
        (nn.LayerNorm(5), (4, 3, 5)),
        (nn.LayerNorm((3, 5)), (4, 3, 5)),
        (nn.LayerNorm(5, bias=False), (4, 2, 5)),
        (nn.RMSNorm(5), (4, 3, 5)),
        (nn.RMSNorm((3, 5), eps=1e-3), (4, 3, 5)),
        (nn.GroupNorm(2, 4), (3, 4, 5)),
        (nn.GroupNorm(1, 4), (3, 4, 2, 3)),
        (nn.GroupNorm(4, 4), (1, 4, 6)),
        (nn.GroupNorm(2, 6), (3, 6)),
        (nn.GroupNorm(3, 6, eps=1e-2), (2, 6, 2, 2, 3)),
        (nn.InstanceNorm1d(3, affine=True), (4, 3, 5)),
        (nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 3, 3)),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_norm_layers_match_exact(layer, shape, reduction, weighted):
    torch.manual_seed(0)
    layer = layer.double()
    # vmap cannot update running statistics in place: that layer gets the per-example backward truth.
    truth = "backward" if getattr(layer, "track_running_stats", False) else "vmap"
    check_rule(layer, 3 * torch.randn(*shape, dtype=torch.float64) + 1, reduction, truth, weighted=weighted)


@pytest.mark.parametrize("trainable", ["weight", "bias", "both"])
def test_group_norm_with_frozen_parts_in_float32(trainable):
    torch.manual_seed(0)
    layer = nn.GroupNorm(4, 8)
    layer.weight.requires_grad_(trainable != "bias")
    layer.bias.requires_grad_(trainable != "weight")
    check_rule(layer, 3 * torch.randn(5, 8, 6, 7) + 2, "mean")


def test_group_norm_from_the_forward_statistics():
    torch.manual_seed(0)
    layer = nn.GroupNorm(3, 6).double()
    inputs = (3 * torch.randn(4, 6, 5, dtype=torch.float64) + 1).requires_grad_(True)
    out = layer(inputs)
    grad_output = torch.randn_like(out)
    stats = normalization.group_norm_saved_stats(out.grad_fn, layer, grad_output)
    assert stats is not None
    # The statistics computed independently of the layer: mean and 1/sqrt(var + eps) of each example's group.
    var, mean = torch.var_mean(inputs.detach().reshape(4, 3, -1), -1, correction=0)
    torch.testing.assert_close(stats[0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[1], (var + layer.eps).rsqrt(), rtol=1e-12, atol=0)
    got = normalization.group_norm_sq_norm_from_stats(layer, (inputs.detach(),), grad_output, stats)
    expected = layer_sq_norms_by_vmap(layer, inputs.detach(), grad_output)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    # Another node, or statistics of another shape, are not taken for the forward's.
    assert normalization.group_norm_saved_stats(out.sum().grad_fn, layer, grad_output) is None
    assert normalization.group_norm_saved_stats(out.grad_fn, layer, grad_output[:2]) is None


@pytest.mark.parametrize("shape", [(4, 6), (4, 5, 6), (4, 2, 3, 6)])
def test_layer_norm_from_the_forward_statistics(shape):
    torch.manual_seed(0)
    layer = nn.LayerNorm(shape[-1]).double()
    inputs = (3 * torch.randn(*shape, dtype=torch.float64) + 1).requires_grad_(True)
    out = layer(inputs)
    grad_output = torch.randn_like(out)
    stats = normalization.layer_norm_saved_stats(out.grad_fn, layer, grad_output)
    assert stats is not None
    # The statistics computed independently of the layer: the mean and 1/sqrt(var + eps) of each position.
    var, mean = torch.var_mean(inputs.detach(), -1, correction=0, keepdim=True)
    torch.testing.assert_close(stats[0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[1], (var + layer.eps).rsqrt(), rtol=1e-12, atol=0)
    got = normalization.layer_norm_sq_norm_from_stats(layer, (inputs.detach(),), grad_output, stats)
    torch.testing.assert_close(got, layer_sq_norms_by_vmap(layer, inputs.detach(), grad_output), rtol=1e-10, atol=0)
    # Another node, or statistics of another shape, are not taken for the forward's.
    assert normalization.layer_norm_saved_stats(out.sum().grad_fn, layer, grad_output) is None
    assert normalization.layer_norm_saved_stats(out.grad_fn, layer, grad_output[:2]) is None


def test_instance_norm_in_eval_uses_running_statistics():
    torch.manual_seed(0)
    layer = nn.InstanceNorm1d(3, affine=True, track_running_stats=True).double()
    layer(torch.randn(8, 3, 5, dtype=torch.float64))  # move the running statistics away from (0, 1)
    check_rule(layer.eval(), torch.randn(4, 3, 5, dtype=torch.float64), "sum")


@pytest.mark.parametrize("weighted", [False, True])
def test_batch_norm_in_eval_mode_matches_exact(weighted):
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3).double()
    layer(torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1)
    check_rule(layer.eval(), torch.randn(4, 3, 4, 4, dtype=torch.float64), "mean", weighted=weighted)


def test_batch_norm_in_training_mode_is_refused():
    layer = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match=r"GroupNorm or LayerNorm.*`ddp` or `accumulation`"):
        batch_norm_sq_norm(layer, (torch.randn(4, 3),), torch.ones(4, 3))


def test_layer_norm_without_affine_has_nothing_to_measure():
    assert not list(nn.LayerNorm(4, elementwise_affine=False).parameters())
    layer = nn.LayerNorm(4)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    torch.testing.assert_close(layer_norm_sq_norm(layer, (torch.randn(2, 4),), torch.ones(2, 4)), torch.zeros(2))


def test_norm_rules_name_the_wrong_layer():
    for rule in (layer_norm_sq_norm, rms_norm_sq_norm, group_norm_sq_norm, instance_norm_sq_norm, batch_norm_sq_norm):
        with pytest.raises(TypeError, match="Linear"):
            rule(nn.Linear(2, 2), (torch.ones(1, 2),), torch.ones(1, 2))


# ---------------------------------------------------------------------- MultiheadAttention


def _mha_truth(
    mha: nn.MultiheadAttention, args: tuple[Tensor, ...], kwargs: dict, weights: Tensor, sq_weights: dict | None = None
) -> Tensor:
    """One batched forward, one backward per example (batch dim 1 when not batch_first); entries weighted."""
    out = mha(*args, **kwargs)[0]
    batch_dim = 0 if mha.batch_first else 1
    per_example = (out * weights).sum(tuple(d for d in range(3) if d != batch_dim))
    params = {name: p for name, p in mha.named_parameters() if p.requires_grad}
    norms = []
    for i in range(per_example.shape[0]):
        grads = torch.autograd.grad(per_example[i], list(params.values()), retain_graph=True)
        norms.append(
            sum(
                (g.double().square() * (1.0 if sq_weights is None else sq_weights[name])).sum()
                for name, g in zip(params, grads, strict=True)
            )
        )
    return torch.stack(norms)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        "self",
        "cross_kdim",
        "kdim_partly_frozen",
        "padding_mask",
        "float_mask",
        "causal",
        "weights",
        "3d_mask",
        "frozen_in_proj",
        "distinct_qkv",
    ],
)
def test_multihead_attention_matches_exact(batch_first, case, weighted):
    torch.manual_seed(0)
    batch, tgt, src, dim, heads = 3, 4, 5, 8, 2
    kdim = 6 if case in ("cross_kdim", "kdim_partly_frozen") else None
    mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kdim, vdim=kdim).double()
    if case == "frozen_in_proj":
        mha.in_proj_weight.requires_grad_(False)
    if case == "kdim_partly_frozen":
        mha.k_proj_weight.requires_grad_(False)  # shares its input with the trainable v projection
    query = torch.randn(batch, tgt, dim, dtype=torch.float64)
    memory = torch.randn(batch, src, kdim or dim, dtype=torch.float64)
    self_attention = case in ("self", "causal", "weights", "frozen_in_proj")
    key = query if self_attention else memory
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    src_len = tgt if self_attention else src
    kwargs: dict = {"need_weights": case == "weights"}
    if case == "padding_mask":
        kwargs["key_padding_mask"] = torch.tensor([[False] * (src - i) + [True] * i for i in range(batch)])
    if case == "float_mask":
        kwargs["attn_mask"] = torch.randn(tgt, src_len, dtype=torch.float64)
    if case == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt, dtype=torch.float64)
        kwargs["is_causal"] = True
    if case == "3d_mask":
        kwargs["attn_mask"] = torch.rand(batch * heads, tgt, src_len) < 0.3
        kwargs["attn_mask"][..., 0] = False
    value = key.clone() if case == "distinct_qkv" else key  # equal values, but three tensors
    if case == "distinct_qkv":
        key = key + 0.5
    out = mha(query, key, value, **kwargs)[0]
    weights = torch.randn(out.shape, dtype=torch.float64)
    sq_weights = random_weights(mha) if weighted else None
    got = multihead_attention_sq_norm(mha, (query, key, value), kwargs, (weights, None), weights=sq_weights)
    assert got is not None
    expected = _mha_truth(mha, (query, key, value), kwargs, weights, sq_weights)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL, atol=0)


def test_multihead_attention_hands_unsupported_calls_to_the_fallback():
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)
    x = torch.randn(2, 3, 4)
    assert multihead_attention_sq_norm(mha, (x, x, x), {}, (torch.ones(2, 3, 4), None)) is None
    plain = nn.MultiheadAttention(4, 2, batch_first=True)
    assert multihead_attention_sq_norm(plain, (x, x, x), {}, (torch.ones(2, 3, 4), torch.ones(2, 3, 3))) is None
    assert multihead_attention_sq_norm(nn.MultiheadAttention(4, 2, dropout=0.5), (x, x, x), {}, (x, None)) is None


# ---------------------------------------------------------------------- fallback


class Scale(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale)


@pytest.mark.parametrize("weighted", [False, True])
def test_fallback_per_example_grads_match_exact(weighted):
    torch.manual_seed(0)
    layer = Scale(4)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    weights = torch.randn(5, 3, 4, dtype=torch.float64)
    sq_weights = random_weights(layer) if weighted else None
    layout = batch_layout(layer, (x,), {}, num_outputs=1)
    got = sq_norm_of_grads(per_example_grads(layer, dict(layer.named_parameters()), layout, [weights]), sq_weights)
    torch.testing.assert_close(got, layer_sq_norms_by_vmap(layer, x, weights, sq_weights), rtol=RTOL, atol=0)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return mask @ (x @ self.weight)


def test_fallback_shares_a_positional_tensor_of_another_length():
    layer = Masked()
    x, mask = torch.randn(5, 3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64).tril()
    layout = batch_layout(layer, (x, mask), {}, num_outputs=1)
    assert layout.arg_dims == {0: 0}
    weights = torch.randn(5, 3, 4, dtype=torch.float64)
    got = sq_norm_of_grads(per_example_grads(layer, dict(layer.named_parameters()), layout, [weights]))
    out = layer(x, mask)
    per_example = (out * weights).sum((1, 2))
    expected = torch.stack(
        [torch.autograd.grad(per_example[i], layer.weight, retain_graph=True)[0].square().sum() for i in range(5)]
    )
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=0)


def test_fallback_replays_multihead_attention_sequence_first():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, add_bias_kv=True).double()  # batch_first=False: batch is dim 1
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    kwargs = {"key_padding_mask": torch.tensor([[False, False, True], [False, False, False]]), "need_weights": False}
    weights = torch.randn(3, 2, 4, dtype=torch.float64)
    layout = batch_layout(mha, (x, x, x), kwargs, num_outputs=1)
    assert layout.batch_size == 2
    got = sq_norm_of_grads(per_example_grads(mha, dict(mha.named_parameters()), layout, [weights]))
    torch.testing.assert_close(got, _mha_truth(mha, (x, x, x), kwargs, weights), rtol=RTOL, atol=0)


# ---------------------------------------------------------------------- registry


def test_registry_lookup_is_by_exact_type():
    class MyLinear(nn.Linear):
        pass

    assert get_norm_rule(nn.Linear(2, 2)) is linear_sq_norm
    assert get_norm_rule(MyLinear(2, 2)) is None
    assert get_call_rule(nn.MultiheadAttention(4, 2)) is multihead_attention_sq_norm
    assert get_norm_rule(nn.ReLU()) is None


def test_register_norm_rule_refuses_duplicates_unless_overwrite(monkeypatch):
    monkeypatch.setattr(registry, "_RULE_SPECS", dict(registry._RULE_SPECS))

    def rule(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> Tensor:
        return grad_output.new_zeros(grad_output.shape[0])

    with pytest.raises(ValueError, match=r"already registered for Linear.*overwrite=True"):
        register_norm_rule(nn.Linear)(rule)
    assert register_norm_rule(nn.Linear, overwrite=True)(rule) is rule
    assert get_norm_rule(nn.Linear(2, 2)) is rule
    with pytest.raises(TypeError, match=r"nn\.Module"):
        register_norm_rule(int)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one"):
        register_norm_rule()
