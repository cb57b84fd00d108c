"""Learned structure: hard-concrete gates, their cost, reading a structure off them (GQA-consistent,
on the target within one FFN channel), folding them into a cut that computes what the gated model
did, and ``prune --structured learned`` end to end with its refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli
from transformers import AutoModelForCausalLM

from autoprune.models import load_model
from autoprune.structure import build_subnet, model_dims
from autoprune.training import (
    FolderCheckpoints,
    HealConfig,
    HealData,
    Healer,
    LoraSettings,
    StructureGates,
    UnitCosts,
    hard_concrete,
    keep_probability,
    learn_structure,
)


def test_hard_concrete_gates_are_exact_zeros_and_ones_at_the_extremes() -> None:
    log_alpha = torch.tensor([-20.0, 0.0, 20.0])
    assert hard_concrete(log_alpha, sample=False).tolist() == [0.0, pytest.approx(0.5), 1.0]
    drawn = torch.stack([hard_concrete(log_alpha, sample=True) for _ in range(200)])
    assert drawn[:, 0].max() == 0.0 and drawn[:, 2].min() == 1.0
    assert 0.0 < drawn[:, 1].mean() < 1.0
    assert keep_probability(log_alpha)[0] < 1e-6 and keep_probability(log_alpha)[2] > 1 - 1e-6


@pytest.fixture
def gated(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    dims = model_dims(loaded.model)
    gates = StructureGates(loaded.model, dims, kept=0.75, costs=UnitCosts.of_weights(dims))
    return loaded, dims, gates


def test_expected_cost_is_the_dense_cost_when_every_gate_is_on(gated) -> None:
    loaded, dims, gates = gated
    with torch.no_grad():
        for parameter in gates._unit_parameters().values():
            parameter.fill_(30.0)
    linear = sum(loaded.model.get_submodule(n).weight.numel() for n in loaded.adapter.all_layer_names(loaded.model))
    assert float(gates.expected_cost().detach()) == pytest.approx(linear)
    gates.penalty().backward()  # on the dense cost, the Lagrangian pulls toward the target
    assert gates.lambdas.grad[0] == pytest.approx(0.0625)


def test_the_target_comes_down_over_the_ramp_and_the_penalty_follows_it(tiny_llama_dir) -> None:
    loaded = load_model(str(tiny_llama_dir))
    dims = model_dims(loaded.model)
    gates = StructureGates(loaded.model, dims, kept=0.6, costs=UnitCosts.of_weights(dims), ramp_steps=4)
    with torch.no_grad():
        for parameter in gates._unit_parameters().values():
            parameter.fill_(30.0)  # every gate on: the dense cost
    targets = []
    for step in range(6):
        gates.sample(step)
        targets.append(gates.target)
    assert targets == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.6, 0.6])
    gates.sample(1)
    gates.penalty().backward()  # the gap to step 1's target, not to the final one
    assert gates.lambdas.grad[0] == pytest.approx(0.04)


def test_read_off_lands_on_the_target_gqa_consistent_and_the_cut_computes_the_gated_model(gated) -> None:
    loaded, dims, gates = gated
    with torch.no_grad():
        for parameter in gates._unit_parameters().values():
            parameter.uniform_(-1.0, 4.0, generator=torch.Generator().manual_seed(0))
    cuts, structure, removed = gates.read_off()
    costs = UnitCosts.of_weights(dims)
    kept = sum(costs.of_block(cut.shape) for cut in cuts) / costs.dense(dims)
    assert 0.75 - 3 * dims.hidden / costs.dense(dims) <= kept <= 0.75  # within one FFN channel
    for cut in cuts:
        groups = {head // dims.heads_per_group for head in cut.heads}
        assert len(groups) == cut.shape.kv_groups and len(cut.heads) == cut.shape.heads
        assert all(sum(h // dims.heads_per_group == g for h in cut.heads) == cut.shape.heads_per_group for g in groups)
    # Units the cut leaves out get exactly-zero gates: then the cut computes what the gated model does.
    with torch.no_grad():
        for cut in cuts:
            heads = torch.full((dims.num_heads,), -30.0)
            heads[cut.heads] = gates.heads[cut.index][cut.heads]
            gates.heads[cut.index] = heads
            groups = torch.full((dims.num_kv_heads,), -30.0)
            kept_groups = sorted({h // dims.heads_per_group for h in cut.heads})
            groups[kept_groups] = gates.groups[cut.index][kept_groups]
            gates.groups[cut.index] = groups
            channels = torch.full((dims.ffn,), -30.0)
            channels[cut.channels] = gates.ffn[cut.index][cut.channels]
            gates.ffn[cut.index] = channels
        gates.block[removed] = -30.0
    ids = torch.randint(3, loaded.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), gates.evaluating():
        expected = loaded.model(ids, use_cache=False).logits
    assert gates.read_off()[0] == cuts
    gates.fold(loaded.model)
    gates.remove()
    cut = build_subnet(loaded.model, None, structure, removed, cuts=cuts)
    with torch.no_grad():
        got = cut(ids, use_cache=False).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_gates_killed_and_resumed_end_where_an_uninterrupted_run_does(tiny_llama_dir, data_dir, tmp_path) -> None:
    """A step's gate draws follow from the seed and the step: a resumed run draws what an
    uninterrupted one does, and ends with its gates and weights."""
    teacher = load_model(str(tiny_llama_dir))
    dims = model_dims(teacher.model)
    config = HealConfig(tokens=6 * 4 * 16, seq_len=16, batch_size=4, lr=1e-3, validation_windows=2,
                        evaluations=1, checkpoint_every=2, precision="fp32")
    data = HealData.from_source(str(data_dir), teacher, 16, 2, config.tokens, None, False)

    def run(checkpoints=None, stop_after=None):
        student = copy.deepcopy(teacher.model)
        gates = StructureGates(student, dims, 0.75, UnitCosts.of_weights(dims), ramp_steps=2, seed=config.seed)
        healer = Healer(student, teacher.model, data, config, torch.device("cpu"), regularizer=gates)
        return healer.run(checkpoints, False, stop_after), {**student.state_dict(), **gates.state_dict()}

    result, expected = run()
    saved = FolderCheckpoints(tmp_path / "gates", "learned")
    torch.manual_seed(123)  # the global generator's state is not what the draws depend on
    assert run(saved, stop_after=3)[0].steps == 3
    resumed, got = run(saved)
    assert resumed.resumed_from == 2 and resumed.steps == config.steps == 6
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [m.kl for m in resumed.measurements] == [m.kl for m in result.measurements]


def test_a_structure_learned_with_lora_adapters_is_cut_from_the_merged_weights(tiny_llama_dir, data_dir) -> None:
    """Compresso's setting: the gates train with LoRA adapters, which are merged before the gates
    fold into the weights and the model is cut."""
    teacher = load_model(str(tiny_llama_dir))
    config = HealConfig(tokens=8 * 4 * 16, seq_len=16, batch_size=4, lr=1e-3, validation_windows=2,
                        evaluations=1, precision="fp32", lora=LoraSettings(rank=4))
    learned = learn_structure(teacher, str(data_dir), 0.25, config, progress=False)
    assert 0.74 <= learned.kept <= 0.75
    layers = {type(module).__name__ for name, module in learned.model.named_modules() if name.endswith("_proj")}
    assert layers == {"Linear"}  # no adapter left unmerged
    assert learned.gates.steps + learned.heal.steps == config.steps


def test_warm_started_gates_read_off_the_units_the_statistics_rank_highest(gated) -> None:
    """Before any training, gates warm-started from importance scores cut what the scores would:
    every FFN channel kept outranks every channel dropped, across blocks; equal scores change nothing."""
    loaded, dims, gates = gated
    generator = torch.Generator().manual_seed(0)
    heads = torch.rand(dims.num_blocks, dims.num_heads, generator=generator) + 0.1
    ffn = torch.rand(dims.num_blocks, dims.ffn, generator=generator) + 0.1
    before = {name: p.detach().clone() for name, p in gates._unit_parameters().items()}
    gates.warm_start(torch.ones_like(heads), torch.ones_like(ffn), spread=1.0)
    assert all(torch.equal(before[name], p) for name, p in gates._unit_parameters().items())
    gates.warm_start(heads, ffn, spread=1.0)
    assert torch.equal(gates.groups, before["groups"]) and torch.equal(gates.block, before["block"])
    assert torch.equal(gates.ffn.argsort(dim=1), ffn.argsort(dim=1))
    cuts, _, _ = gates.read_off()
    kept = torch.zeros_like(ffn, dtype=torch.bool)
    for cut in cuts:
        kept[cut.index, cut.channels] = True
    assert kept.any() and (~kept).any()
    assert float(ffn[kept].min()) > float(ffn[~kept].max())


def _learned_args(tiny_llama_dir, data_dir, out, *extra):
    return ["prune", "--model", tiny_llama_dir, "--data", data_dir, "--structured", "learned", "--target", "0.25",
            "--tokens", 8 * 4 * 16, "--train-seq-len", 16, "--batch-size", 4, "--seq-len", 32, "--calib-samples", 8,
            "--eval-windows", 2, "--out", out, "--format", "json", *extra]


def test_prune_structured_learned_writes_a_model_of_the_target_size(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, *_learned_args(tiny_llama_dir, data_dir, tmp_path / "learned", "--lr", "1e-3"))
    assert code == 0, err
    report = json.loads(out)
    assert 0.74 <= 1 - report["sparsity"] <= 0.76
    metadata = json.loads((tmp_path / "learned" / "autoprune.json").read_text())
    assert metadata["recipe"]["plan"]["structure"]["method"] == "learned"
    learned = metadata["learned"]
    assert learned["gates"]["steps"] + learned["heal"]["steps"] == 8
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "learned", trust_remote_code=True)
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert linear == report["linear_params"]
    assert not list(tmp_path.glob(".learned*"))  # checkpoints removed once the model is written


def test_prune_structured_learned_with_lora_records_the_adapters(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, *_learned_args(tiny_llama_dir, data_dir, tmp_path / "learned", "--lora", "4"))
    assert code == 0, err
    assert 0.74 <= 1 - json.loads(out)["sparsity"] <= 0.76
    metadata = json.loads((tmp_path / "learned" / "autoprune.json").read_text())
    assert metadata["learned"]["config"]["lora"]["rank"] == 4


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target", "1.5"], "--target must lie in (0, 1)"),
        (["--tokens", "0"], "tokens"),
        (["--recipe", "r.yaml"], "cannot be combined"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "3"], "does not split over 3 workers"),
    ],
)
def test_bad_learned_input_is_one_line_and_writes_nothing(tiny_llama_dir, data_dir, tmp_path, capsys, flags, message) -> None:
    args = _learned_args(tiny_llama_dir, data_dir, tmp_path / "out")
    for flag in flags[::2]:
        index = args.index(flag) if flag in args else None
        if index is not None:
            del args[index:index + 2]
    code, _, err = run_cli(capsys, *args, *flags)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_learned_structure_needs_a_llama_family_model(tiny_opt_dir, data_dir, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, *_learned_args(tiny_opt_dir, data_dir, tmp_path / "out"))
    assert code == 2 and "LLaMA-family" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_workers_go_with_a_learned_structure_only(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "prune", "--model", tiny_llama_dir, "--data", data_dir, "--sparsity", "0.5",
                           "--workers", "2", "--out", tmp_path / "out")
    assert code == 2 and "go with --structured learned" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
