"""Test stand-in for ``torchvision`` (see ``tests/sglang_stubs/README.md``).

SGLang's config and multimodal modules import ``torchvision`` (and submodules such as
``torchvision.transforms``) at import time, and PyPI's torchvision wheels need CUDA torch. Here every
``torchvision.*`` module exists, every attribute is a placeholder, and *calling* anything raises: a text
model never calls it, and a multimodal path that does fails loudly instead of silently.
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+cpu.stand.in"


class _Unavailable:
    """A placeholder attribute: attribute access chains, calls raise."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Unavailable:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is a stand-in in the SGLang CPU test setup")

    def __mro_entries__(self, bases):  # `class X(torchvision.something):` at import time
        return (object,)


def _module_getattr(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr in _REAL_ATTRIBUTES:
            return _REAL_ATTRIBUTES[attr]
        return _Unavailable(f"{module_name}.{attr}")

    return __getattr__


class InterpolationMode(enum.Enum):
    """The real enum's members (``torchvision.transforms.InterpolationMode``): transformers and SGLang use
    it in annotations and defaults at class-definition time, never to resize anything here."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_REAL_ATTRIBUTES = {"InterpolationMode": InterpolationMode}


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []  # a package, so deeper submodules resolve too
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module) -> None:
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


sys.meta_path.append(_StubFinder())
__getattr__ = _module_getattr(__name__)
