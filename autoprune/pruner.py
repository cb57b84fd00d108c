"""Turning plans into pruned models, from one dense model and its cached statistics."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from autoprune.calibration import (
    BlockEdit,
    CalibrationStats,
    LinearStats,
    block_passes,
    calibrate,
    statistics_folder,
)
from autoprune.errors import AutopruneError
from autoprune.methods import LayerJob, PruningMethod
from autoprune.models import LoadedModel
from autoprune.plan import LayerSpec, MethodName, Plan
from autoprune.quantization import (
    QuantizedTensor,
    Quantizer,
    gguf_row_lengths,
    point_at,
    quantization_jobs,
)
from autoprune.structure import CutCache, build_subnet, kept_inputs, kept_layer_inputs

if TYPE_CHECKING:  # the database module imports this one
    from autoprune.variants import VariantDatabase


class Pruner:
    """Holds the dense weights, the statistics and each method's reusable state.

    The model's linear layers are re-pointed at new tensors for every plan; the dense tensors are
    kept aside untouched, so applying plan after plan never reloads or copies the model.
    """

    def __init__(
        self, loaded: LoadedModel, stats: CalibrationStats, database: VariantDatabase | None = None
    ) -> None:
        self.loaded = loaded
        self.stats = stats
        #: Pruned variants and sub-network cuts read instead of computed again, and stored once
        #: computed.
        self.database = database
        self.adapter = loaded.adapter
        self.layer_names = self.adapter.all_layer_names(loaded.model)
        self._dense = {
            name: loaded.model.get_submodule(name).weight.data for name in self.layer_names
        }
        self._methods: dict[str, PruningMethod] = {}
        self._cuts = CutCache(store=database.cuts if database is not None else None)
        self._quantizer = Quantizer(store=database.quantized if database is not None else None)

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks(self.loaded.model)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(weight.shape) for name, weight in self._dense.items()}

    @property
    def dense_linear_params(self) -> int:
        """Weights of all decoder linear layers before pruning: what sparsity is a fraction of."""
        return sum(rows * cols for rows, cols in self.layer_shapes().values())

    def validate(self, plan: Plan) -> None:
        validate_plan(plan, self.layer_names, self.num_blocks)
        if plan.quantization is not None:
            gguf_row_lengths(self.loaded, plan)

    def pruned_weights(self, plan: Plan) -> dict[str, torch.Tensor]:
        """The weight of every linear layer of every kept block under ``plan``."""
        self.validate(plan)
        return self.prune_layers(plan.method, self.kept_layers(plan))

    def kept_layers(self, plan: Plan) -> dict[str, LayerSpec]:
        """The spec of every linear layer in a block ``plan`` keeps (dense where it names none)."""
        removed = set(plan.removed_blocks)
        return {
            name: plan.layers.get(name, LayerSpec())
            for name in self._dense
            if self.adapter.split_layer_name(name)[0] not in removed
        }

    def prune_layers(self, method: MethodName, specs: dict[str, LayerSpec]) -> dict[str, torch.Tensor]:
        """Each named layer's weight under its spec (the dense tensor itself where it stays dense).
        One call per batch of layers, so a method can batch layers of one shape together. With a
        database, layers on its grid are read from it, and those it lacks are stored once pruned."""
        jobs = [
            LayerJob(name, self._dense[name], self.stats.layer(name), spec)
            for name, spec in specs.items()
            if not spec.is_dense
        ]
        result = {name: self._dense[name] for name, spec in specs.items() if spec.is_dense}
        if jobs and self.database is not None:
            stored, jobs = self.database.lookup(method, jobs)
            result.update(stored)
        if jobs:
            pruned = self._method(method).prune(jobs)
            result.update(pruned)
            if self.database is not None:
                self.database.store(method, jobs, pruned)
        return result

    @contextmanager
    def applied(self, plan: Plan) -> Iterator[torch.nn.Module]:
        """The model pruned to ``plan`` inside the ``with``; dense again after it. A sub-network
        plan gives a new, smaller model (:meth:`subnet`) instead. A quantized plan's tensors hold
        their dequantized values (what llama.cpp computes with)."""
        if plan.structure is not None:
            model = self.subnet(plan)
            if plan.quantization is not None:
                point_at(model, self.quantized(plan, model))
            yield model
            return
        weights = self.pruned_weights(plan)
        if plan.quantization is None:
            with self.pointed(weights, plan.removed_blocks) as model:
                yield model
            return
        tensors = self.quantized(plan, weights=weights)
        linear = {name.removesuffix(".weight"): tensor for name, tensor in tensors.items()}
        dequantized = {
            name: tensor.dequantized().to(weights[name].device, weights[name].dtype)
            for name, tensor in linear.items() if name in weights
        }
        others = {name: tensor for name, tensor in tensors.items() if name.removesuffix(".weight") not in weights}
        with self.pointed({**weights, **dequantized}, plan.removed_blocks) as model:
            before = point_at(model, others)
            try:
                yield model
            finally:
                parameters = dict(model.named_parameters(remove_duplicate=False))
                for name, data in before.items():
                    parameters[name].data = data

    def quantized(
        self, plan: Plan, model: torch.nn.Module | None = None, weights: dict[str, torch.Tensor] | None = None
    ) -> dict[str, QuantizedTensor]:
        """The tensors of the model ``plan`` makes as its quantization stores them, by parameter
        name: of ``model`` (a sub-network plan's, names renumbered) or of the dense model with its
        layers at ``weights`` (dense names). Each (tensor, type, importance) is quantized once."""
        assert plan.quantization is not None
        self.validate(plan)
        if plan.structure is not None:
            assert model is not None
            inputs = kept_layer_inputs(self.loaded.model, self.stats, plan, cache=self._cuts)
            linears = {
                renamed: (name, model.get_submodule(renamed).weight.detach(), stats)
                for name, (renamed, stats) in inputs.items()
            }
        else:
            assert weights is not None
            model = self.loaded.model
            linears = {name: (name, weight, self.stats.layer(name)) for name, weight in weights.items()}
        return self._quantizer.quantize(quantization_jobs(plan.quantization, model, linears))

    def subnet(self, plan: Plan) -> torch.nn.Module:
        """The physically smaller model of a sub-network plan, cut from the dense weights (left
        unchanged) with the cached statistics, then the layers the plan prunes on top pruned by its
        method from the statistics of their kept inputs."""
        inputs = kept_inputs(self.loaded.model, self.stats, plan, self._cuts)  # checked before the cut
        model = build_subnet(self.loaded.model, self.stats, plan.structure, plan.removed_blocks, self._cuts)
        if not inputs:
            return model
        jobs = [
            LayerJob(renamed, model.get_submodule(renamed).weight.detach(), stats, plan.layers[name])
            for name, (renamed, stats) in inputs.items()
        ]
        # A method of its own: what it derives from a cut's inputs is of no use to another cut.
        with torch.inference_mode(False), torch.no_grad():
            pruned = PruningMethod.named(plan.method).prune(jobs)
        for name, weight in pruned.items():
            model.get_submodule(name).weight.data = weight
        return model

    @contextmanager
    def pointed(
        self, weights: dict[str, torch.Tensor], removed_blocks: list[int] | None = None
    ) -> Iterator[torch.nn.Module]:
        """The model with its linear layers pointing at ``weights`` (others dense) inside the
        ``with``: how a caller that keeps pruned layers of its own (see ``autoprune refine``)
        measures them without pruning anything again."""
        model = self.loaded.model
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight
        try:
            with self.adapter.without_blocks(model, removed_blocks or []):
                yield model
        finally:
            for name, weight in self._dense.items():
                model.get_submodule(name).weight.data = weight

    def materialize(self, plan: Plan) -> torch.nn.Module:
        """Prune the model in place for good (blocks removed), for saving; a sub-network plan gives
        its smaller model. The pruner is spent."""
        return self.materialize_quantized(plan)[0]

    def materialize_quantized(self, plan: Plan) -> tuple[torch.nn.Module, dict[str, QuantizedTensor]]:
        """:meth:`materialize`, and a quantized plan's tensors as a GGUF file stores them (by the
        saved model's parameter names; the model holds their dequantized values)."""
        if plan.structure is not None:
            model = self.subnet(plan)
            tensors = self.quantized(plan, model) if plan.quantization is not None else {}
            point_at(model, tensors)
            self._dense.clear()
            return model, tensors
        model = self.loaded.model
        kept = [block for block in range(self.num_blocks) if block not in plan.removed_blocks]
        weights = self.pruned_weights(plan)
        tensors = self.quantized(plan, weights=weights) if plan.quantization is not None else {}
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight.contiguous()
        point_at(model, tensors)
        self.adapter.remove_blocks(model, plan.removed_blocks)
        self._dense.clear()
        return model, {self._renumbered(name, kept): tensor for name, tensor in tensors.items()}

    def _renumbered(self, name: str, kept: list[int]) -> str:
        """A dense parameter name with its block numbered as in the model without removed blocks."""
        prefix = self.adapter.blocks_path + "."
        if not name.startswith(prefix):
            return name
        block, _, rest = name[len(prefix):].partition(".")
        return f"{prefix}{kept.index(int(block))}.{rest}"

    def _method(self, name: str) -> PruningMethod:
        if name not in self._methods:
            self._methods[name] = PruningMethod.named(name)
        return self._methods[name]


def validate_plan(plan: Plan, layer_names: list[str], num_blocks: int) -> None:
    """Refuse a plan made for another model: unknown layers, blocks it does not have, or none left."""
    unknown = sorted(set(plan.layers) - set(layer_names))
    if unknown:
        raise AutopruneError(f"plan names layers this model does not have: {unknown[0]}")
    if plan.removed_blocks and max(plan.removed_blocks) >= num_blocks:
        raise AutopruneError(f"plan removes block {max(plan.removed_blocks)}, the model has {num_blocks}")
    if len(plan.removed_blocks) >= num_blocks:
        raise AutopruneError("plan removes every block")


def prune_sequentially(
    loaded: LoadedModel,
    windows: torch.Tensor,
    plan: Plan,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> torch.nn.Module:
    """Prune ``loaded.model`` in place to ``plan``, block after block, each block from statistics of
    the inputs that the blocks pruned before it produce (SparseGPT's and llm-compressor's
    sequential pipeline), and remove the plan's blocks.

    Later blocks then compensate for the error of earlier ones, which :class:`Pruner`'s dense
    statistics cannot: a few percent lower perplexity for SparseGPT on small models. It costs a
    calibration pass (two forwards per block) for every plan, so it is for the variant a user
    exports, never for search trials, and it is not the variant a study measured.
    """
    sequential_pass(loaded, windows, plan, device, batch_size, progress)
    loaded.adapter.remove_blocks(loaded.model, plan.removed_blocks)
    return loaded.model


def sequential_pass(
    loaded: LoadedModel,
    windows: torch.Tensor,
    plan: Plan,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    progress: bool = True,
) -> None:
    """:func:`prune_sequentially` without removing the plan's blocks (they are skipped): the layers
    of ``loaded.model`` point at their sequentially pruned weights afterwards, and a caller that
    keeps the dense ones (``Pruner.pointed``) can measure the variant and restore the model. A
    sub-network plan is refused: the pass prunes the dense model's layers, it cuts nothing."""
    if plan.structure is not None:
        raise AutopruneError("the sequential recipe does not apply to sub-network plans yet")
    model, adapter = loaded.model, loaded.adapter
    validate_plan(plan, adapter.all_layer_names(model), adapter.num_blocks(model))
    removed = frozenset(plan.removed_blocks)
    edit = sequential_edit(loaded, plan)
    for _block_statistics in block_passes(loaded, windows, torch.device(device), batch_size, progress, edit, removed):
        pass  # the edits are what counts


def sequential_statistics(
    pruner: Pruner,
    windows: torch.Tensor,
    plan: Plan,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> CalibrationStats:
    """The statistics :func:`prune_sequentially` prunes ``plan`` from: each layer's inputs in the
    model whose earlier blocks ``plan`` has already pruned. Pruning ``plan`` from them gives the
    sequential weights, and pruning a plan near ``plan`` from them nearly its own sequential
    weights, at a one-shot prune's cost: how ``autoprune refine`` ranks candidates for the
    sequential recipe without a calibration pass per candidate. Cached like any statistics, keyed
    by the plan; ``pruner``'s model is dense again afterwards."""
    pruner.validate(plan)
    edit = (_sequential_name(plan), sequential_edit(pruner.loaded, plan))
    device = next(pruner.loaded.model.parameters()).device
    with pruner.pointed({}):  # the pass prunes the model's weights; leaving restores the dense ones
        result = calibrate(
            pruner.loaded, windows, cache_dir, device, progress=progress, edit=edit,
            skip=frozenset(plan.removed_blocks),
        )
    return result.stats


def sequential_statistics_folder(
    pruner: Pruner, windows: torch.Tensor, plan: Plan, cache_dir: Path | None = None
) -> Path:
    """Where :func:`sequential_statistics` caches ``plan``'s statistics, computed or not."""
    return statistics_folder(pruner.loaded, windows, cache_dir, _sequential_name(plan))


def _sequential_name(plan: Plan) -> str:
    return f"sequential-{hashlib.sha256(plan.model_dump_json().encode()).hexdigest()[:16]}"


def sequential_edit(loaded: LoadedModel, plan: Plan) -> BlockEdit:
    """The block edit of sequential pruning: prune the block's layers to ``plan`` from the
    statistics of the inputs the block gets, in place."""
    adapter = loaded.adapter
    method = PruningMethod.named(plan.method)

    def prune_block(index: int, block: torch.nn.Module, groups: dict[str, LinearStats]) -> None:
        modules, jobs = {}, []
        for group in adapter.input_groups:
            stats = groups[adapter.layer_name(index, group[0])]
            for member in group:
                name = adapter.layer_name(index, member)  # methods key their caches by full name
                spec = plan.layers.get(name)
                if spec is not None and not spec.is_dense:
                    modules[name] = block.get_submodule(member)
                    jobs.append(LayerJob(name, modules[name].weight.data, stats, spec))
        for name, weight in method.prune(jobs).items():  # pruned where the block computes
            modules[name].weight.data = weight.contiguous()

    return prune_block
