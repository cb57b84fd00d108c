"""llama.cpp's own quantizer, called per tensor through the ``ggml`` library llama-cpp-python ships.

``llama_model_quantize`` quantizes whole files with one preset; a plan names a type (and an
importance matrix) per tensor, so the tensors are quantized one by one with
``ggml_quantize_chunk``, the function ``llama-quantize`` itself calls for every tensor, and read
back with the type's ``to_float``, the function llama.cpp dequantizes with. The library is found
beside the ``llama_cpp`` package (the ``gguf`` extra: ``pip install -e ".[gguf]"``, built with
``CMAKE_ARGS=-DGGML_NATIVE=OFF``), loaded on first use.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from autoprune.errors import AutopruneError

_LIBRARY = "libggml-base.so"
_LOCK = threading.Lock()


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_path() -> Path | None:
    """Where llama-cpp-python's ``ggml`` library is, or None where the package is absent."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / _LIBRARY
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise AutopruneError(
            "quantizing to this GGUF type needs llama.cpp's quantizer: install the gguf extra "
            '(CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e ".[gguf]")'
        )
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    """Whether llama.cpp's quantizer can be loaded here."""
    return library_path() is not None


def quantize(weight: np.ndarray, ggml_type: int, imatrix: np.ndarray | None) -> np.ndarray:
    """``weight`` (float32, rows x cols) quantized to ``ggml_type`` row by row, as
    ``llama-quantize`` does, weighing each column's rounding by ``imatrix`` (cols) if given: the
    tensor's bytes, as a uint8 array of rows x row bytes."""
    lib = _ggml()
    source = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = source.shape
    out = np.empty((rows, lib.ggml_row_size(ggml_type, cols)), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    with _LOCK:  # the quantization tables are initialised once per type, not concurrently
        lib.ggml_quantize_init(ggml_type)
    written = lib.ggml_quantize_chunk(
        ggml_type, source.ctypes.data, out.ctypes.data, 0, rows, cols,
        None if weights is None else weights.ctypes.data,
    )
    if written != out.nbytes:
        raise AutopruneError(f"llama.cpp's quantizer wrote {written} bytes, expected {out.nbytes}")
    return out


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """The float32 values llama.cpp computes with for ``data`` (a tensor of ``ggml_type``)."""
    traits = _ggml().ggml_get_type_traits(ggml_type).contents
    source = np.ascontiguousarray(data)
    out = np.empty(shape, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(source.ctypes.data, out.ctypes.data, out.size)
    return out
