"""Per-layer sparsity on top of a sub-network: pruned from the statistics of the inputs the cut
keeps, counted on the kept weights, exported and reloaded, refused in one line where it cannot be."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoprune import CalibrationConfig, EvaluationConfig, Pruner, prune
from autoprune.calibration import calibrate
from autoprune.errors import AutopruneError
from autoprune.measure import measure_size
from autoprune.models import load_model
from autoprune.plan import LayerSpec, NMPattern, Plan
from autoprune.structure import BlockWidths, Structure, build_subnet, kept_inputs
from search_spaces import SpaceContext

#: Block 1 keeps one query head per KV group and 40 channels; block 3 loses its attention.
STRUCTURE = Structure(
    method="weighted",
    blocks={1: BlockWidths(heads_per_group=1, ffn=40), 3: BlockWidths(drop_attention=True)},
)
LAYERS = {
    "model.layers.1.self_attn.o_proj": LayerSpec(sparsity=0.5),
    "model.layers.1.mlp.down_proj": LayerSpec(sparsity=0.25),
    "model.layers.2.self_attn.q_proj": LayerSpec(nm=NMPattern(n=2, m=4)),
    "model.layers.3.mlp.up_proj": LayerSpec(sparsity=0.75),
}


@pytest.fixture
def tiny(tiny_llama_dir: Path):
    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(3, loaded.model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(loaded, windows, progress=False).stats
    return loaded, stats, windows


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruned_layers_hold_their_share_of_the_kept_weights(tiny, method: str) -> None:
    loaded, stats, _ = tiny
    dense = {name: p.detach().clone() for name, p in loaded.model.named_parameters()}
    plan = Plan(method=method, structure=STRUCTURE, removed_blocks=[0], layers=LAYERS)
    pruner = Pruner(loaded, stats)
    model = pruner.subnet(plan)
    cut = build_subnet(loaded.model, stats, STRUCTURE, [0])
    renamed = {name: new for name, (new, _) in kept_inputs(loaded.model, stats, plan).items()}
    # blocks renumbered once block 0 is gone: original block b is block b - 1
    assert renamed == {name: name.replace(f"layers.{b}.", f"layers.{b - 1}.")
                       for name in LAYERS for b in [int(name.split(".")[2])]}
    for name, spec in LAYERS.items():
        weight = model.get_submodule(renamed[name]).weight
        assert weight.shape == cut.get_submodule(renamed[name]).weight.shape
        if spec.nm is not None:
            assert (weight.reshape(-1, 4) != 0).sum(1).max() <= 2
        else:  # every row keeps the same count: sparsity of the kept inputs
            zeros = (weight == 0).sum(1)
            assert zeros.min() == zeros.max() == round(spec.sparsity * weight.shape[1])
    pruned = set(renamed.values())
    for name, weight in cut.state_dict().items():
        if name.removesuffix(".weight") not in pruned:
            assert torch.equal(weight, model.state_dict()[name]), name
    size = measure_size(model, loaded.adapter)
    ctx = SpaceContext.from_model(loaded, stats, method, (0.1, 0.9))
    assert size.linear_nonzeros == ctx.nonzeros(plan) < ctx.nonzeros(plan.model_copy(update={"layers": {}}))
    for name, parameter in loaded.model.named_parameters():  # the dense model is left as it was
        assert torch.equal(parameter, dense[name]), name


@pytest.mark.parametrize(
    ("widths", "layer"),
    [(BlockWidths(heads_per_group=1), "self_attn.o_proj"), (BlockWidths(ffn=40), "mlp.down_proj")],
)
def test_kept_input_statistics_are_those_the_sub_network_sees(tiny, widths, layer) -> None:
    """Where nothing before a cut layer changes but its own sub-block's width, its inputs are the
    dense model's on the kept columns: the restricted statistics must be the sub-network's own."""
    loaded, stats, windows = tiny
    structure = Structure(method="activation", blocks={0: widths})
    plan = Plan(structure=structure, layers={f"model.layers.0.{layer}": LayerSpec(sparsity=0.5)})
    inputs = kept_inputs(loaded.model, stats, plan)
    subnet = build_subnet(loaded.model, stats, structure)
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            seen[name] = seen.get(name, 0) + x.T @ x
        return hook

    for name, (renamed, _) in inputs.items():
        subnet.get_submodule(renamed).register_forward_pre_hook(record(name))
    with torch.no_grad():
        subnet(windows, use_cache=False)
    for name, (_, kept) in inputs.items():
        scale = seen[name].abs().max()  # calibration sums in float32
        assert (kept.xtx.double() - seen[name]).abs().max() <= 1e-5 * scale, name
        assert kept.group != stats.layer(name).group


def test_export_of_a_pruned_sub_network_reloads_with_its_non_zeros(tiny_llama_dir, data_dir, tmp_path) -> None:
    plan = Plan(method="wanda", structure=STRUCTURE, removed_blocks=[0], layers=LAYERS)
    config = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    report = prune(str(tiny_llama_dir), config, plan, tmp_path / "out",
                   EvaluationConfig(source=str(data_dir), seq_len=32, max_windows=2), tmp_path / "cache", False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    linear = [m.weight for name, m in reloaded.named_modules() if name.startswith("model.layers.")
              and isinstance(m, torch.nn.Linear)]
    assert sum(int((w != 0).sum()) for w in linear) == report.size.linear_nonzeros
    assert report.size.linear_nonzeros < report.size.linear_params


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ({"model.layers.3.self_attn.q_proj": LayerSpec(sparsity=0.5)}, "does not keep"),
        ({"model.layers.0.mlp.up_proj": LayerSpec(sparsity=0.5)}, "does not keep"),
        ({"model.layers.1.mlp.down_proj": LayerSpec(nm=NMPattern(n=2, m=16))}, "keeps 40 inputs"),
    ],
)
def test_layers_the_sub_network_does_not_keep_are_refused_before_the_cut(tiny, layers, message) -> None:
    loaded, stats, _ = tiny
    plan = Plan(structure=STRUCTURE, removed_blocks=[0], layers=layers)
    with pytest.raises(AutopruneError, match=message):
        Pruner(loaded, stats).subnet(plan)
