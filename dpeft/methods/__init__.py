"""Methods: the registry and one package per method. Importing this package registers all of them."""

import importlib
import pkgutil

from dpeft.methods.base import MethodLayer
from dpeft.methods.registry import Method, get_method, register_method, registered_methods
from dpeft.methods.types import PeftType

# Every subpackage is a method whose __init__ makes one register_method call: adding a method needs no edit here.
for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "MethodLayer", "PeftType", "get_method", "register_method", "registered_methods"]
