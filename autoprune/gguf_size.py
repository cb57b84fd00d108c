"""What the GGUF file of a plan's model weighs, from the plan and the dense model's shapes alone.

``gguf_bytes``, the cost a GGUF study minimizes, is the size of the file ``export --format gguf``
writes: its header (the model's key-values, the tokenizer's, a record per tensor) and every
tensor's bytes in its type's block layout, each padded to the alignment (see
:func:`autoprune.export_gguf.gguf_file_bytes`). A :class:`GGUFSizer` is measured once per model
(the tokenizer's key-values) and is plain data after that, so a search space prices candidates and
a worker its trials by the same arithmetic; a test checks it against written files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from autoprune.export_gguf import (
    GGUFLayout,
    gguf_file_bytes,
    gguf_header_bytes,
    gguf_name,
    gguf_tensor_shapes,
    layout_of,
    model_gguf,
    tokenizer_metadata_bytes,
)
from autoprune.models import LoadedModel
from autoprune.plan import Plan
from autoprune.quantization import EMBEDDINGS, OUTPUT, Quantization, embedding_tensors
from autoprune.structure import ModelDims, model_dims, resolve_blocks

#: The type of matrices a plan without a quantization is written in (``export --format gguf``).
UNQUANTIZED = "f16"


@dataclass(frozen=True)
class GGUFSizer:
    """The dense model's shape and the bytes of its tokenizer's key-values."""

    config: PretrainedConfig
    dims: ModelDims
    vocab_rows: int
    tied: bool
    tokenizer_bytes: int
    _headers: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, loaded: LoadedModel) -> GGUFSizer:
        """Measured on ``loaded``: its tokenizer written as an export writes it (copied from the
        GGUF the model came from, if it did)."""
        model = loaded.model
        vocab_rows = model.get_input_embeddings().weight.shape[0]
        tokenizer = tokenizer_metadata_bytes(loaded.tokenizer, model_gguf(loaded.spec), vocab_rows)
        return cls(model.config, model_dims(model), vocab_rows, len(embedding_tensors(model)) == 1, tokenizer)

    def layout(self, plan: Plan) -> GGUFLayout:
        """The widths of the blocks ``plan`` keeps, as the file's header states them."""
        kept = [shape for shape in resolve_blocks(plan.structure, plan.removed_blocks, self.dims) if shape is not None]
        return layout_of(
            self.dims.head_dim, [s.heads for s in kept], [s.kv_groups for s in kept], [s.ffn for s in kept]
        )

    def plan_bytes(self, plan: Plan) -> int:
        """The size of the GGUF file of ``plan``'s model."""
        layout = self.layout(plan)
        shapes = gguf_tensor_shapes(layout, self.dims.hidden, self.vocab_rows, self.tied)
        key = (layout.architecture, tuple(layout.heads), tuple(layout.kv_heads), tuple(layout.ffn))
        if key not in self._headers:
            self._headers[key] = gguf_header_bytes(self.config, layout, shapes)
        types = self._types(plan)
        tensors = {name: (shape, types.get(name, self._default(plan))) for name, shape in shapes.items()}
        return gguf_file_bytes(self._headers[key], self.tokenizer_bytes, tensors)

    def _default(self, plan: Plan) -> str:
        return plan.quantization.default if plan.quantization is not None else UNQUANTIZED

    def _types(self, plan: Plan) -> dict[str, str]:
        """Every matrix's type by its GGUF name (blocks renumbered past removed ones)."""
        quantization = plan.quantization
        if quantization is None:
            return {}
        kept = [b for b, shape in enumerate(resolve_blocks(plan.structure, plan.removed_blocks, self.dims))
                if shape is not None]
        types = {"token_embd.weight": quantization.type_of(EMBEDDINGS), "output.weight": quantization.type_of(OUTPUT)}
        for name, kind in quantization.layers.items():
            block, _, rest = name.removeprefix("model.layers.").partition(".")
            if int(block) in kept:
                renamed = gguf_name(f"model.layers.{kept.index(int(block))}.{rest}.weight")
                if renamed is not None:
                    types[renamed] = kind
        return types


@dataclass(frozen=True)
class GGUFContext:
    """What a search space of GGUF types knows of the model: its file's arithmetic and llama.cpp's
    preset mixes of it (plain data, gathered once per search)."""

    sizer: GGUFSizer
    #: ``llama-quantize``'s presets (Q4_K_M, ...) as quantizations, by name.
    presets: dict[str, Quantization]

    def plan_bytes(self, plan: Plan) -> int:
        return self.sizer.plan_bytes(plan)
