"""Stand-in for a package that has no CPU build (installed as ``<name>/__init__.py`` by install.sh).

SGLang 0.5.12 imports ``sgl_kernel`` and ``torchvision`` at module level, also on the code paths a
CPU text model never runs; PyPI has neither for torch 2.13.0+cpu. Here every submodule imports and
every attribute exists, so those imports succeed, and anything actually called fails loudly: a test
that reached one would see which kernel it needs instead of a wrong result.
"""

import importlib.abc
import importlib.machinery
import sys
import types

_PACKAGE = __name__
# Checked by SGLang's and transformers' version probes; the versions SGLang 0.5.12 expects.
__version__ = {"sgl_kernel": "0.4.2.post2", "torchvision": "0.28.0"}.get(_PACKAGE, "0")


class _Missing(type):
    """Class-level attribute access (``stub.SomeClass.method``) resolves too."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing


class Missing(metaclass=_Missing):
    """Any name from the stub package: subclassable and instantiable (decorators, type hints), never callable."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{_PACKAGE} is a CPU test stub (scripts/sglang_cpu): this code path needs the real one")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Missing()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return Missing


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(_PACKAGE + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Submodules())
