"""llama.cpp's own preset mixes (``llama-quantize`` Q4_K_M, Q3_K_M, Q2_K) as plan quantizations.

A preset gives each tensor a type by a fixed rule of its name, shape and depth (llama.cpp's
``llama_tensor_get_type``), then falls back where a row cannot hold the type. Rather than restate
that rule, the dense model is written as an f16 GGUF, quantized by llama.cpp
(``llama_model_quantize``, through llama-cpp-python) to each preset, and each tensor's type read
back: the :class:`~autoprune.quantization.Quantization` that writes what ``llama-quantize`` writes,
at the very same bytes. The types depend on the model's shapes only, and are kept in the cache
(``<cache>/gguf-presets/<model fingerprint>-<llama-cpp-python version>.json``), so a model pays for
them once.
"""

from __future__ import annotations

import ctypes
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import gguf

from autoprune._atomic import write_text_atomic
from autoprune.calibration import default_cache_dir
from autoprune.errors import AutopruneError
from autoprune.export_gguf import model_gguf, parameter_name, write_gguf
from autoprune.gguf_size import GGUFContext, GGUFSizer
from autoprune.models import LoadedModel
from autoprune.quantization import EMBEDDINGS, GGUF_TENSOR_TYPES, OUTPUT, Quantization

#: The presets a study's baselines include, by ``llama-quantize``'s names.
PRESETS: dict[str, gguf.LlamaFileType] = {
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q3_K_M": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
}
_TYPE_NAMES = {kind.ggml: name for name, kind in GGUF_TENSOR_TYPES.items()}
#: A log callback that drops every line (a module global: llama.cpp keeps the pointer).
_SILENT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda level, text, data: None)


def gguf_context(loaded: LoadedModel, sizer: GGUFSizer | None = None, cache_dir: Path | None = None) -> GGUFContext:
    """What GGUF search spaces need of ``loaded``: its file's arithmetic (``sizer``, measured here
    when not given) and llama.cpp's presets of it."""
    return GGUFContext(sizer or GGUFSizer.of(loaded), llama_cpp_presets(loaded, cache_dir))


def llama_cpp_presets(loaded: LoadedModel, cache_dir: Path | None = None) -> dict[str, Quantization]:
    """Each of :data:`PRESETS` as the quantization that gives every tensor of ``loaded``'s model
    the type ``llama-quantize`` gives it (read from the cache, else measured and kept there)."""
    llama_cpp = _llama_cpp()
    path = (cache_dir or default_cache_dir()) / "gguf-presets" / f"{loaded.fingerprint()}-{llama_cpp.__version__}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        return {name: Quantization.model_validate(value) for name, value in stored.items()}
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "f16.gguf"
        write_gguf(loaded.model, loaded.tokenizer, source, "f16", model_gguf(loaded.spec))
        presets = {name: _preset(source, Path(scratch) / f"{name}.gguf", ftype) for name, ftype in PRESETS.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({name: q.model_dump(mode="json") for name, q in presets.items()}, indent=1))
    return presets


def file_quantization(path: Path) -> Quantization:
    """The quantization of the GGUF file ``path``: each matrix's type, by the plan's names."""
    layers: dict[str, str] = {}
    named: dict[str, str] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) != 2:
            continue
        kind = _TYPE_NAMES.get(tensor.tensor_type)
        parameter = parameter_name(tensor.name)
        if kind is None or parameter is None:
            raise AutopruneError(f"{path.name}: tensor {tensor.name} of type {tensor.tensor_type.name} has no plan type")
        source = {"model.embed_tokens.weight": EMBEDDINGS, "lm_head.weight": OUTPUT}.get(parameter)
        if source is not None:
            named[source] = kind
        else:
            layers[parameter.removesuffix(".weight")] = kind
    return Quantization(layers=layers, embeddings=named.get(EMBEDDINGS), output=named.get(OUTPUT))


def _preset(source: Path, out: Path, ftype: gguf.LlamaFileType) -> Quantization:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 1
    with _quiet(llama_cpp):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if failed:
        raise AutopruneError(f"llama.cpp could not quantize the model to {ftype.name}")
    return file_quantization(out)


@contextmanager
def _quiet(llama_cpp: ModuleType) -> Iterator[None]:
    """llama.cpp's log lines (a line per tensor while quantizing) silenced inside the ``with``;
    llama-cpp-python's own logger is put back after it."""
    llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def _llama_cpp() -> ModuleType:
    """llama-cpp-python, or a one-line error saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp._logger  # its callback, which _quiet puts back
    except ImportError:
        raise AutopruneError(
            "llama.cpp's preset mixes need llama-cpp-python: install the gguf extra "
            '(CMAKE_ARGS=-DGGML_NATIVE=OFF pip install -e ".[gguf]")'
        ) from None
    return llama_cpp
