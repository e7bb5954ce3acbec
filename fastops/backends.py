"""Backend discovery: import each backend's kernel modules; a backend that fails to import is
recorded as unavailable (with the reason) instead of registered.

Modules of one backend are imported in ladder-chapter order: matmul, conv2d, then the un-fused
conv2d_bias_relu stages are derived from the conv2d stages, then the backend's fused module.
"""
from __future__ import annotations

import importlib
import threading

from . import registry

# backend -> (matmul module, conv2d module, conv2d_bias_relu module); None = derive only.
BACKEND_MODULES = {
    "numpy": ("fastops.numpy_backend", None, None),
    "numba": ("fastops.kernels.numba.matmul", "fastops.kernels.numba.conv2d",
              "fastops.kernels.numba.conv2d_bias_relu"),
    "cython": ("fastops.kernels.cython.matmul", "fastops.kernels.cython.conv2d",
               "fastops.kernels.cython.conv2d_bias_relu"),
    "cupy": ("fastops.kernels.cuda.matmul", "fastops.kernels.cuda.conv2d",
             "fastops.kernels.cuda.conv2d_bias_relu"),
}

_lock = threading.RLock()
_loaded = False
_unavailable: dict[str, str] = {}


def _load_backend(name: str, modules) -> None:
    matmul_mod, conv_mod, fused_mod = modules
    for module in (matmul_mod, conv_mod):
        if module is not None:
            importlib.import_module(module)
    registry.derive_unfused_conv_bias_relu(name)
    if fused_mod is not None:
        importlib.import_module(fused_mod)


def load_all() -> None:
    """Import every backend once (thread-safe); failures are kept in :func:`unavailable`."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        for name, modules in BACKEND_MODULES.items():
            try:
                _load_backend(name, modules)
            except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
                _unavailable[name] = f"{type(exc).__name__}: {exc}"
        _loaded = True


def unavailable() -> dict[str, str]:
    """backend -> why it is not available on this machine."""
    load_all()
    return dict(_unavailable)


def available() -> list[str]:
    load_all()
    return [b for b in BACKEND_MODULES if b not in _unavailable]
