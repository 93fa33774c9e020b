"""Methods: the registry and one package per method. Importing this package registers all of them."""

from dpeft.methods.base import MethodLayer
from dpeft.methods.registry import Method, get_method, register_method, registered_methods
from dpeft.methods.types import PeftType

from dpeft.methods import lora  # noqa: E402,F401  (registers the method)

__all__ = ["Method", "MethodLayer", "PeftType", "get_method", "register_method", "registered_methods"]
