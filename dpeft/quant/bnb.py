"""Handlers for bitsandbytes' quantized linear layers: `Linear4bit` (nf4/fp4, double quant) and `Linear8bitLt`.

Every method sits on a quantized base through these handlers and nothing else: the base forward is the bnb
layer's own, `weight()` is the dequantized float (out, in) weight (for merging and DoRA's norms) and
`set_weight()` re-quantizes a merged weight into the layer, as PEFT does (with its rounding caveat).
`to_float_module()` is the other merge policy: a float `nn.Linear` holding the dequantized weight.

bitsandbytes is imported lazily, inside the methods that need it: layers are recognised by class name and
module, so `import dpeft` never imports bitsandbytes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dpeft.quant.handlers import LinearHandler

_BNB_4BIT = "Linear4bit"
_BNB_8BIT = "Linear8bitLt"
# Class names of quantized layers in other libraries (and bnb's own aliases) that must never be mistaken for a
# plain `nn.Linear`, which many of them subclass.
_QUANTIZED_NAMES = {
    _BNB_4BIT,
    _BNB_8BIT,
    "LinearNF4",
    "LinearFP4",
    "QuantLinear",
    "HQQLinear",
    "EetqLinear",
    "AqlmLinear",
    "QLinear",
    "WQLinear_GEMM",
    "WQLinear_GEMV",
    "Int8Linear",
    "Float8Linear",
}


def _bnb_base(layer: nn.Module) -> str | None:
    """``"Linear4bit"`` / ``"Linear8bitLt"`` when `layer` is (a subclass of) that bitsandbytes class, else None."""
    for cls in type(layer).__mro__:
        if cls.__name__ in (_BNB_4BIT, _BNB_8BIT) and cls.__module__.startswith("bitsandbytes"):
            return cls.__name__
    return None


def _unsupported(layer: nn.Module, why: str) -> ValueError:
    cls = type(layer)
    return ValueError(
        f"unsupported quantized layer {cls.__module__}.{cls.__qualname__} ({why}); supported quantized layers: "
        "bitsandbytes.nn.Linear4bit (nf4/fp4, incl. LinearNF4/LinearFP4) and bitsandbytes.nn.Linear8bitLt, "
        "quantized (moved to a device) before adapters are added"
    )


def check_quantized_layer(layer: nn.Module) -> None:
    """Raise a `ValueError` naming `layer`'s type if it looks quantized but no handler can serve it.

    Quantized layers of other libraries often subclass `nn.Linear`; without this check the plain linear handler
    would take them and read their packed integer weight as if it were a float one.
    """
    if _bnb_base(layer) is not None:
        return
    names = {c.__name__ for c in type(layer).__mro__}
    if names & _QUANTIZED_NAMES:
        raise _unsupported(layer, "a quantized layer type dpeft does not know")
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and not (weight.is_floating_point() or weight.is_complex()):
        raise _unsupported(layer, f"its weight is {weight.dtype}, not a float tensor")


class _BnbHandler(LinearHandler):
    """What both bnb handlers share: linear kind, sizes, and a float replacement module."""

    kind = "linear"
    bnb_class: str = ""

    @classmethod
    def accepts(cls, layer: nn.Module) -> bool:
        check_quantized_layer(layer)
        if _bnb_base(layer) != cls.bnb_class:
            return False
        cls.check_state(layer)
        return True

    @classmethod
    def check_state(cls, layer: nn.Module) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def float_dtype(self) -> torch.dtype:
        """The dtype a dequantized copy of this layer gets."""
        return torch.float32

    def to_float_module(self) -> nn.Linear:
        """A float `nn.Linear` with this layer's dequantized weight and its bias (the "dequantize" merge policy)."""
        weight = self.weight().detach()
        dtype = self.float_dtype()
        bias = self.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(weight)
            if bias is not None:
                out.bias.copy_(bias)
        out.weight.requires_grad_(False)
        if bias is not None:
            out.bias.requires_grad_(bias.requires_grad)
        return out

    def quantization(self) -> dict[str, object]:
        """How this layer is quantized, for manifests and merge records."""
        raise NotImplementedError


class Linear4bitHandler(_BnbHandler):
    """bitsandbytes `Linear4bit`: weight packed two values per byte, with a `QuantState` (absmax, code, dtype)."""

    bnb_class = _BNB_4BIT

    @classmethod
    def check_state(cls, layer: nn.Module) -> None:
        weight = layer.weight
        if type(weight).__name__ != "Params4bit":
            raise _unsupported(layer, f"weight is {type(weight).__name__}, expected bitsandbytes Params4bit")
        if not getattr(weight, "bnb_quantized", False) or weight.quant_state is None:
            raise _unsupported(
                layer,
                "its Params4bit weight is not quantized yet: move the model to a device "
                "(e.g. `model.to('cpu')` or `.cuda()`) before adding adapters",
            )

    def _unpacked(self) -> tuple[torch.Tensor, object]:
        """(packed weight, quant state) in bnb's standard layout (undoing the CPU AVX512 inference packing)."""
        weight, state = self.layer.weight.data, self.layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            # The inverse rewrites the state it is given; the layer keeps running on its packed copy.
            weight, state = _convert_weight_packed_for_cpu_inverse(weight, copy.copy(state))
        return weight, state

    def weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        weight, state = self._unpacked()
        return bnbf.dequantize_4bit(weight, state)

    def float_dtype(self) -> torch.dtype:
        return self._unpacked()[1].dtype

    def stored_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize `weight` into the layer with its own quant type, block size and double quantization.

        The same `quantize_4bit` call bnb makes when a `Params4bit` moves to a device (and PEFT's merge makes), but
        into the existing parameter, so that optimizers and hooks holding it stay valid.
        """
        import bitsandbytes.functional as bnbf

        param = self.layer.weight
        dtype = self._unpacked()[1].dtype
        packed, state = bnbf.quantize_4bit(
            weight.detach().to(device=param.device, dtype=dtype).contiguous(),
            blocksize=param.blocksize,
            compress_statistics=param.compress_statistics,
            quant_type=param.quant_type,
            quant_storage=param.quant_storage,
        )
        param.data, param.quant_state, self.layer.quant_state = packed, state, state
        _bump_version(param)

    def quantization(self) -> dict[str, object]:
        w, state = self.layer.weight, self._unpacked()[1]
        compute = self.layer.compute_dtype
        return {
            "quant_method": "bitsandbytes",
            "bits": 4,
            "quant_type": w.quant_type,
            "blocksize": w.blocksize,
            "double_quant": bool(w.compress_statistics),
            "dtype": str(state.dtype).removeprefix("torch."),
            "compute_dtype": None if compute is None else str(compute).removeprefix("torch."),
        }


class Linear8bitLtHandler(_BnbHandler):
    """bitsandbytes `Linear8bitLt` (LLM.int8()): int8 rows with one float scale (SCB) per output row."""

    bnb_class = _BNB_8BIT

    @classmethod
    def check_state(cls, layer: nn.Module) -> None:
        weight = layer.weight
        if type(weight).__name__ != "Int8Params":
            raise _unsupported(layer, f"weight is {type(weight).__name__}, expected bitsandbytes Int8Params")
        if weight.has_fp16_weights:
            if not weight.is_floating_point():
                raise _unsupported(layer, f"has_fp16_weights=True but its weight is {weight.dtype}")
            return
        if weight.dtype != torch.int8:
            raise _unsupported(
                layer,
                f"its Int8Params weight is {weight.dtype}, not int8: move the model to a "
                "device (e.g. `model.to('cpu')` or `.cuda()`) to quantize it first",
            )
        if cls._scale(layer) is None:
            raise _unsupported(layer, "its int8 weight has no row scales (SCB) in the weight or the layer state")

    @staticmethod
    def _scale(layer: nn.Module) -> torch.Tensor | None:
        # bnb keeps SCB on the weight until the first forward, then moves it to `layer.state`.
        scb = getattr(layer.weight, "SCB", None)
        return scb if scb is not None else getattr(layer.state, "SCB", None)

    def weight(self) -> torch.Tensor:
        w = self.layer.weight
        if w.has_fp16_weights:
            return w
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(w.data, self._scale(self.layer).to(w.device))

    def float_dtype(self) -> torch.dtype:
        w = self.layer.weight
        return w.dtype if w.has_fp16_weights else torch.float32

    def stored_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize `weight` to int8 rows with row scales, as bnb does when an `Int8Params` moves to a device."""
        import bitsandbytes.functional as bnbf

        param = self.layer.weight
        if param.has_fp16_weights:
            param.data.copy_(weight.to(param.dtype))
        else:
            rows, scales, _ = bnbf.int8_vectorwise_quant(weight.detach().to(param.device, torch.float16).contiguous())
            param.data, param.CB, param.SCB = rows, rows, scales
            self.layer.state.reset_grads()  # the next forward takes CB/SCB from the weight again
        _bump_version(param)

    def quantization(self) -> dict[str, object]:
        return {
            "quant_method": "bitsandbytes",
            "bits": 8,
            "threshold": float(self.layer.state.threshold),
            "has_fp16_weights": bool(self.layer.weight.has_fp16_weights),
        }


def _bump_version(param: torch.Tensor) -> None:
    """Count a write through `.data` as a change of `param`, for caches keyed on its version (DoRA's row norms)."""
    with torch.no_grad():
        param.add_(0)


def is_bnb_layer(module: nn.Module) -> bool:
    """True for bitsandbytes `Linear4bit`/`Linear8bitLt` (and subclasses), recognised without importing bnb."""
    return _bnb_base(module) is not None


def quantized_handler(module: nn.Module) -> _BnbHandler | None:
    """The bnb handler for `module`, or None for a layer that is not a bnb quantized linear layer."""
    for handler in (Linear4bitHandler, Linear8bitLtHandler):
        if _bnb_base(module) == handler.bnb_class:
            handler.check_state(module)
            return handler(module)
    return None


def quantize_linear_layers(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace `model`'s `nn.Linear` layers by quantized bitsandbytes layers, in place, on the weights' device.

    The way to quantize a model that was built from a config rather than loaded (transformers'
    ``BitsAndBytesConfig`` needs ``from_pretrained``); the result is the same kind of layer bnb gives there.

    Args:
        model: Any module; its `nn.Linear` children are replaced.
        bits: 4 (`Linear4bit`) or 8 (`Linear8bitLt`, LLM.int8() with outlier threshold 6.0).
        quant_type: 4-bit data type, ``"nf4"`` or ``"fp4"``.
        double_quant: 4-bit: also quantize the block scales (QLoRA's double quantization).
        compute_dtype: 4-bit: dtype of the matmul (None: the input's).
        skip_modules: Names (or name suffixes) of linear layers to keep in float, like transformers' default
            of keeping the output head.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is not supported; use 4 (bnb Linear4bit) or 8 (bnb Linear8bitLt)")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r} is not a bnb 4-bit type; use 'nf4' or 'fp4'")
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.endswith(f".{s}") for s in skip_modules):
            continue
        weight, bias, device = module.weight.data, module.bias, module.weight.device
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(
                weight.cpu(),
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                module=layer,
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features,
                module.out_features,
                bias=bias is not None,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.data.cpu(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to(device))
    return model
