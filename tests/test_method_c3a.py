"""C3A: the block-circulant math against a hand-written reference, gradients against finite differences, and
PEFT's config rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from models import build

import dpeft
from dpeft.methods.c3a.layer import block_circular


def test_c3a_math_matches_a_hand_written_reference():
    """y_m[t] = x . W_delta rows, with block (m, n) of W_delta = w[m, n, (s - t) mod b] / in_features."""
    config = dpeft.C3AConfig(target_modules=["lin0"], block_size=5, init_weights="gaussian")
    model = dpeft.get_peft_model(build("mlp")[0], config).eval()
    lin0 = model.base_model.model.lin0
    w = dpeft.get_peft_model_state_dict(model)["base_model.model.lin0.c3a_kernel"]
    assert w.shape == (4, 2, 5)
    delta = torch.zeros(20, 10)
    for m in range(4):
        for n in range(2):
            for t in range(5):
                for s in range(5):
                    delta[m * 5 + t, n * 5 + s] = w[m, n, (s - t) % 5] / 10
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert_close(lin0.get_delta_weight("default"), delta, atol=1e-6)
        assert_close(lin0(x), lin0.base_layer(x) + x @ delta.T, atol=1e-5)


def test_c3a_gradients_match_finite_differences():
    """Both the kernel and the INPUT gradient are right (PEFT 0.21's hand-written backward fails this check for the
    input, which is why the training-parity row trains a single C3A layer)."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 8, dtype=torch.float64, requires_grad=True)

    def f(x, w):  # float64 throughout for gradcheck (the layer computes in float32)
        n, b = w.shape[1], w.shape[2]
        spec = torch.fft.rfft(x.reshape(3, n, b))
        mixed = torch.einsum("...nk,mnk->...mk", spec, torch.fft.rfft(w).conj())
        return torch.fft.irfft(mixed, n=b).reshape(3, -1)

    assert_close(f(x, w).float(), block_circular(x, w), atol=1e-5)
    assert torch.autograd.gradcheck(f, (x, w))


def test_c3a_config_rules():
    with pytest.raises(ValueError, match="Unknown init_weights"):
        dpeft.C3AConfig(init_weights="orthogonal")
    with pytest.raises(ValueError, match="factor of the input size"):
        dpeft.get_peft_model(build("mlp")[0], dpeft.C3AConfig(target_modules=["lin0"], block_size=4))
    config = dpeft.C3AConfig(target_modules=["lin0", "lin1"], block_size=5, block_size_pattern={"lin1": 10})
    assert config.block_size_for("model.lin1") == 10 and config.block_size_for("lin1") == 5  # PEFT's `.*\.key$`
    with pytest.raises(ValueError, match="not layer types"):
        dpeft.get_peft_model(build("conv2d")[0], dpeft.C3AConfig(target_modules=["conv2d"], block_size=5))
