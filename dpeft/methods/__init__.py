"""Methods: the registry and one package per method. Importing this package registers all of them."""

from dpeft.methods.base import MethodLayer
from dpeft.methods.registry import Method, get_method, register_method, registered_methods
from dpeft.methods.types import PeftType

from dpeft.methods import lora  # noqa: E402,F401  (registers the method)
from dpeft.methods import ia3  # noqa: E402,F401
from dpeft.methods import loha  # noqa: E402,F401
from dpeft.methods import lokr  # noqa: E402,F401
from dpeft.methods import fourierft  # noqa: E402,F401
from dpeft.methods import ln_tuning  # noqa: E402,F401

__all__ = ["Method", "MethodLayer", "PeftType", "get_method", "register_method", "registered_methods"]
