"""Architecture adapters: where a model family keeps its decoder blocks and linear layers.

Everything else in autoprune speaks in terms of "block i" and "linear layer name"; an adapter is the
only place that knows the attribute paths of one family. A new family is a subclass naming its
``model_types``, its block list path and its linear layers grouped by shared input.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

from torch import nn
from transformers import PreTrainedModel

from autoprune.errors import AutopruneError

LayerKind = Literal["attention", "mlp"]


class ArchitectureAdapter(ABC):
    """Maps one transformers model family onto blocks and linear layers.

    ``input_groups`` lists, in forward order, the linear layers of a block that read the same input
    tensor: they share one set of calibration statistics (activation norms, X^T X).
    """

    model_types: ClassVar[tuple[str, ...]]
    blocks_path: ClassVar[str]
    input_groups: ClassVar[tuple[tuple[str, ...], ...]]
    attention_layers: ClassVar[frozenset[str]]

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> ArchitectureAdapter:
        """The adapter whose ``model_types`` include the model's config ``model_type``."""
        model_type = model.config.model_type
        for adapter in _concrete_subclasses(cls):
            if model_type in adapter.model_types:
                return adapter()
        known = sorted(t for a in _concrete_subclasses(cls) for t in a.model_types)
        raise AutopruneError(
            f"model type {model_type!r} has no architecture adapter (supported: {', '.join(known)})"
        )

    @property
    def linear_names(self) -> tuple[str, ...]:
        """Linear layer names inside one block, in forward order."""
        return tuple(name for group in self.input_groups for name in group)

    def kind(self, linear_name: str) -> LayerKind:
        return "attention" if linear_name in self.attention_layers else "mlp"

    def blocks(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def num_blocks(self, model: PreTrainedModel) -> int:
        return len(self.blocks(model))

    def layer_name(self, block: int, linear_name: str) -> str:
        """The full module name that plans use as a key, e.g. ``model.layers.3.mlp.up_proj``."""
        return f"{self.blocks_path}.{block}.{linear_name}"

    def all_layer_names(self, model: PreTrainedModel) -> list[str]:
        return [
            self.layer_name(block, name)
            for block in range(self.num_blocks(model))
            for name in self.linear_names
        ]

    def present_layer_names(self, model: PreTrainedModel) -> list[str]:
        """:meth:`all_layer_names` that ``model`` has: a sub-network's block may lack its attention
        or MLP sub-block."""
        present = []
        for name in self.all_layer_names(model):
            try:
                model.get_submodule(name)
            except AttributeError:
                continue
            present.append(name)
        return present

    def split_layer_name(self, full_name: str) -> tuple[int, str]:
        """Inverse of :meth:`layer_name`."""
        prefix = self.blocks_path + "."
        if not full_name.startswith(prefix):
            raise AutopruneError(f"layer {full_name!r} is not inside {self.blocks_path}")
        block_text, _, linear_name = full_name[len(prefix) :].partition(".")
        if linear_name not in self.linear_names or not block_text.isdigit():
            raise AutopruneError(f"layer {full_name!r} is not a prunable linear layer")
        return int(block_text), linear_name

    def remove_blocks(self, model: PreTrainedModel, removed: list[int]) -> None:
        """Drop whole decoder blocks in place and keep config and per-layer indices consistent.

        Attention modules carry their ``layer_idx`` for the KV cache, and some configs list a
        per-layer attention type; both must follow the renumbering or generation breaks.
        """
        if not removed:
            return
        blocks = self.blocks(model)
        if max(removed) >= len(blocks):
            raise AutopruneError(
                f"cannot remove block {max(removed)}: the model has {len(blocks)} blocks"
            )
        kept = [i for i in range(len(blocks)) if i not in set(removed)]
        parent_path, _, attr = self.blocks_path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, nn.ModuleList(blocks[i] for i in kept))
        for new_index, block in enumerate(self.blocks(model)):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        config = model.config
        config.num_hidden_layers = len(kept)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = [layer_types[i] for i in kept]

    @contextmanager
    def without_blocks(self, model: PreTrainedModel, removed: list[int]) -> Iterator[None]:
        """Remove blocks for the duration of a ``with`` (a trial's evaluation), then put them back
        with their original indices and config."""
        if not removed:
            yield
            return
        blocks = self.blocks(model)
        config = model.config
        saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
        self.remove_blocks(model, removed)
        try:
            yield
        finally:
            parent_path, _, attr = self.blocks_path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, blocks)
            for index, block in enumerate(blocks):
                for module in block.modules():
                    if hasattr(module, "layer_idx"):
                        module.layer_idx = index
            config.num_hidden_layers = saved[0]
            if saved[1] is not None:
                config.layer_types = saved[1]


def _concrete_subclasses(cls: type[ArchitectureAdapter]) -> list[type[ArchitectureAdapter]]:
    found = []
    for sub in cls.__subclasses__():
        if "model_types" in sub.__dict__:
            found.append(sub)
        found.extend(_concrete_subclasses(sub))
    return found


class LlamaFamilyAdapter(ArchitectureAdapter):
    """LLaMA, Mistral, Qwen2 and SmolLM: pre-norm blocks with gated MLPs."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    blocks_path = "model.layers"
    input_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )
    attention_layers = frozenset(
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    )


class OPTAdapter(ArchitectureAdapter):
    """Meta's OPT: the family the SparseGPT and Wanda papers report beside LLaMA."""

    model_types = ("opt",)
    blocks_path = "model.decoder.layers"
    input_groups = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    )
    attention_layers = frozenset(
        {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}
    )
