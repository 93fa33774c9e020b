"""Each method's math on one layer against a hand-written reference (loops and plain tensor algebra).

The references are written from the papers' / HF PEFT's definitions, independently of dpeft's layer code:
(IA)^3 scales outputs (or inputs of feedforward layers), LoHa is a Hadamard product of two rank-r products,
LoKr a Kronecker product, each with PEFT's scaling alpha / r.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import nn

import dpeft
from dpeft.methods.lokr import factorization


class One(nn.Module):
    """A model that is a single layer called `layer`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _adapted(layer: nn.Module, config: dpeft.PeftConfig):
    """(peft model, the base layer's original copy, the adapter tensors dict) for a one-layer model."""
    torch.manual_seed(0)
    base = One(layer)
    original = _copy(layer)
    model = dpeft.get_peft_model(base, config).eval()
    wrapped = model.base_model.model.layer
    return model, original, wrapped.store.get(wrapped.entries["default"])


def _copy(layer: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(layer)


# ---------------------------------------------------------------------------------------------------- (IA)^3
def test_ia3_scales_linear_outputs_and_bias():
    model, base, p = _adapted(
        nn.Linear(6, 4), dpeft.IA3Config(target_modules=["layer"], feedforward_modules=[], init_ia3_weights=False)
    )
    l = p["ia3_l"]  # noqa: E741
    assert l.shape == (4, 1)
    x = torch.randn(3, 6)
    expected = torch.empty(3, 4)
    for n in range(3):
        for o in range(4):
            expected[n, o] = (sum(base.weight[o, i] * x[n, i] for i in range(6)) + base.bias[o]) * l[o, 0]
    with torch.no_grad():
        assert_close(model(x), expected)


def test_ia3_feedforward_scales_linear_inputs():
    model, base, p = _adapted(
        nn.Linear(6, 4),
        dpeft.IA3Config(target_modules=["layer"], feedforward_modules=["layer"], init_ia3_weights=False),
    )
    l = p["ia3_l"]  # noqa: E741
    assert l.shape == (1, 6)
    x = torch.randn(3, 6)
    expected = torch.empty(3, 4)
    for n in range(3):
        for o in range(4):
            expected[n, o] = sum(base.weight[o, i] * x[n, i] * l[0, i] for i in range(6)) + base.bias[o]
    with torch.no_grad():
        assert_close(model(x), expected)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_grouped_conv_forward_and_merge(feedforward):
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1)
    ff = ["layer"] if feedforward else []
    model, base, p = _adapted(
        conv, dpeft.IA3Config(target_modules=["layer"], feedforward_modules=ff, init_ia3_weights=False)
    )
    l = p["ia3_l"].detach()  # noqa: E741
    assert l.shape == ((1, 4, 1, 1) if feedforward else (1, 6, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = base(x * l) if feedforward else base(x) * l
        assert_close(model(x), expected)
        model.merge_adapter()
        assert_close(model(x), expected)  # the grouped-conv weight scaling maps input channels per group
        model.unmerge_adapter()
        assert_close(model.base_model.model.layer.base_layer.weight, base.weight)


# ---------------------------------------------------------------------------------------------------- LoHa
def test_loha_linear_is_hadamard_of_two_low_rank_products():
    config = dpeft.LoHaConfig(target_modules=["layer"], r=3, alpha=6, init_weights=False)
    model, base, p = _adapted(nn.Linear(5, 4), config)
    w1a, w1b, w2a, w2b = (p[k].detach() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    assert (w1a.shape, w1b.shape) == ((4, 3), (3, 5))
    delta = torch.empty(4, 5)
    for o in range(4):
        for i in range(5):
            left = sum(w1a[o, k] * w1b[k, i] for k in range(3))
            right = sum(w2a[o, k] * w2b[k, i] for k in range(3))
            delta[o, i] = left * right * (6 / 3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert_close(model(x), base(x) + x @ delta.T)
        assert_close(model.base_model.model.layer.get_delta_weight("default"), delta)


def test_loha_effective_conv2d_is_cp_decomposition():
    config = dpeft.LoHaConfig(target_modules=["layer"], r=2, alpha=2, init_weights=False, use_effective_conv2d=True)
    model, base, p = _adapted(nn.Conv2d(3, 4, 3), config)
    t1, w1a, w1b, t2, w2a, w2b = (
        p[k].detach() for k in ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")
    )
    assert t1.shape == (2, 2, 3, 3) and w1a.shape == (2, 4) and w1b.shape == (2, 3)

    def rebuild(t, wa, wb):
        w = torch.zeros(4, 3, 3, 3)
        for o in range(4):
            for i in range(3):
                for a in range(2):
                    for b in range(2):
                        w[o, i] += t[a, b] * wa[a, o] * wb[b, i]
        return w

    delta = rebuild(t1, w1a, w1b) * rebuild(t2, w2a, w2b)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(model(x), base(x) + F.conv2d(x, delta))


# ---------------------------------------------------------------------------------------------------- LoKr
@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [
        (256, -1, (16, 16)),
        (128, -1, (8, 16)),
        (127, -1, (1, 127)),
        (128, 4, (4, 32)),
        (20, -1, (4, 5)),
        (10, -1, (2, 5)),
        (20, 3, (2, 10)),
    ],
)
def test_lokr_factorization(dim, factor, expected):
    assert factorization(dim, factor) == expected


def test_lokr_linear_is_kronecker_product():
    config = dpeft.LoKrConfig(target_modules=["layer"], r=8, alpha=4, init_weights=False)
    model, base, p = _adapted(nn.Linear(10, 20), config)
    w1, w2 = p["lokr_w1"].detach(), p["lokr_w2"].detach()
    (a, c), (b, d) = w1.shape, w2.shape
    assert (a * b, c * d) == (20, 10) and (a, b) == factorization(20) and (c, d) == factorization(10)
    delta = torch.empty(20, 10)
    for i in range(a):
        for j in range(c):
            for k in range(b):
                for m in range(d):
                    delta[i * b + k, j * d + m] = w1[i, j] * w2[k, m] * (4 / 8)
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(model(x), base(x) + x @ delta.T)


def test_lokr_low_rank_factors_when_rank_is_small():
    config = dpeft.LoKrConfig(target_modules=["layer"], r=1, alpha=1, init_weights=False, decompose_both=True)
    model, base, p = _adapted(nn.Linear(64, 64), config)
    assert sorted(p) == ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"]
    w1 = p["lokr_w1_a"].detach() @ p["lokr_w1_b"].detach()
    w2 = p["lokr_w2_a"].detach() @ p["lokr_w2_b"].detach()
    assert w1.shape == (8, 8) and w2.shape == (8, 8)
    delta = torch.einsum("ij,km->ikjm", w1, w2).reshape(64, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close(model(x), base(x) + x @ delta.T)


def test_lokr_conv2d_kernel_lives_in_the_second_factor():
    config = dpeft.LoKrConfig(target_modules=["layer"], r=8, alpha=8, init_weights=False)
    model, base, p = _adapted(nn.Conv2d(4, 6, 3), config)
    w1, w2 = p["lokr_w1"].detach(), p["lokr_w2"].detach()
    assert w1.shape == (2, 2) and w2.shape == (3, 2, 3, 3)
    delta = torch.einsum("ij,kmxy->ikjmxy", w1, w2).reshape(6, 4, 3, 3)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_close(model(x), base(x) + F.conv2d(x, delta))


# ---------------------------------------------------------------------------------------------------- FourierFT
def test_fourierft_is_scaled_real_inverse_dft_of_a_sparse_spectrum():
    import math

    config = dpeft.FourierFTConfig(target_modules=["layer"], n_frequency=7, scaling=3.0, random_loc_seed=5)
    model, base, p = _adapted(nn.Linear(6, 4), config)
    spectrum = p["spectrum"].detach()
    # The locations: the first n of a seeded permutation of the out*in entries, row-major.
    flat = torch.randperm(24, generator=torch.Generator().manual_seed(5))[:7]
    delta = torch.zeros(4, 6, dtype=torch.float64)
    for k in range(7):
        u, v = divmod(int(flat[k]), 6)
        for o in range(4):
            for i in range(6):
                # Re(exp(+2*pi*j*(u*o/4 + v*i/6))) / (4*6): the inverse DFT's term of entry (u, v).
                delta[o, i] += spectrum[k].item() * math.cos(2 * math.pi * (u * o / 4 + v * i / 6)) / 24
    delta = (delta * 3.0).float()
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close(model(x), base(x) + x @ delta.T)


# ---------------------------------------------------------------------------------------------------- LN tuning
def test_ln_tuning_uses_the_copied_norm_parameters():
    model, base, p = _adapted(nn.LayerNorm(6), dpeft.LNTuningConfig(target_modules=["layer"]))
    assert torch.equal(p["weight"], base.weight) and torch.equal(p["bias"], base.bias)
    with torch.no_grad():
        p["weight"].mul_(2.0)
        p["bias"].add_(0.5)
    x = torch.randn(3, 6)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + base.eps)
    with torch.no_grad():
        assert_close(model(x), normed * base.weight * 2.0 + base.bias + 0.5)
