"""Every public module, function, class and method of kvref has a docstring (its formula or semantics)."""

import importlib
import inspect
import pkgutil

import pytest

import kvref

# importing numba.cuda here would fix the simulator choice; see tests_cuda
SKIP = {"kvref.cuda", "kvref.cuda.flat", "kvref.cuda.ring", "kvref.cuda.quant", "kvref.cuda.two_tier", "kvref.cuda.pooled"}


def public_modules():
    names = ["kvref"]
    for info in pkgutil.walk_packages(kvref.__path__, "kvref."):
        if info.name not in SKIP and not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def public_objects(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield name, obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if inspect.isfunction(member) or isinstance(member, property):
                        yield f"{name}.{attr}", member


@pytest.mark.parametrize("module_name", public_modules())
def test_public_api_is_documented(module_name):
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip(), f"module {module_name} has no docstring"
    missing = [name for name, obj in public_objects(module) if not (obj.__doc__ or "").strip()]
    assert not missing, f"{module_name}: no docstring on {missing}"
