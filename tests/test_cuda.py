"""On a CUDA device autoprune computes what it computes on the CPU: calibration statistics, every
method's pruned weights, sequential pruning, a saved checkpoint, a search's records and a
refinement. Skipped where no CUDA device is present (CI has none); on a GPU machine:
``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from conftest import REFINE_STUDY, make_jobs, prune_args, tiny_config, with_spec
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autoprune import CalibrationConfig, PlanRequest, prepare
from autoprune.cli import main
from autoprune.data import calibration_windows
from autoprune.methods import LayerJob, PruningMethod
from autoprune.models import load_model
from autoprune.plan import LayerSpec, NMPattern
from autoprune.pruner import prune_sequentially
from autoprune.study import refine_trial, run_search, trial_plan

pytestmark = pytest.mark.cuda  # skipped where torch sees no CUDA device (conftest)

METHODS = PruningMethod.available()

SPECS = {"60%": LayerSpec(sparsity=0.6), "2:4": LayerSpec(nm=NMPattern(n=2, m=4))}


def on_cuda(jobs: list[LayerJob]) -> list[LayerJob]:
    """The same jobs with their weights on the GPU; statistics stay on the CPU, where they load."""
    return [LayerJob(job.name, job.weight.cuda(), job.stats, job.spec) for job in jobs]


def reconstruction_error(job: LayerJob, pruned: torch.Tensor) -> float:
    """``||(W - W') X||^2`` over the calibration inputs: what SparseGPT minimises."""
    delta = (job.weight - pruned.cpu()).double()
    return float(torch.einsum("ij,jk,ik->", delta, job.stats.xtx.double(), delta))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_methods_prune_on_cuda_as_on_cpu(method: str, spec: LayerSpec) -> None:
    jobs = with_spec(make_jobs(), spec)
    on_cpu = PruningMethod.named(method).prune(jobs)
    on_gpu = PruningMethod.named(method).prune(on_cuda(jobs))
    for job in jobs:
        gpu = on_gpu[job.name]
        assert gpu.device.type == "cuda"
        assert torch.equal((gpu != 0).sum(dim=1).cpu(), (on_cpu[job.name] != 0).sum(dim=1))
        if method == "sparsegpt":  # its updates round differently there: near-ties may swap
            agreement = ((gpu != 0).cpu() == (on_cpu[job.name] != 0)).float().mean()
            assert agreement > 0.99, job.name
            errors = reconstruction_error(job, gpu), reconstruction_error(job, on_cpu[job.name])
            assert errors[0] == pytest.approx(errors[1], rel=0.01), job.name
        else:  # scores are element-wise products: the same bits on either device
            assert torch.equal(gpu.cpu(), on_cpu[job.name]), job.name


def test_calibration_on_cuda_gives_the_cpu_statistics(tiny_llama_dir, data_dir, tmp_path) -> None:
    config = CalibrationConfig(source=str(data_dir), n_samples=16, seq_len=64)
    loaded, on_cpu, _ = prepare(str(tiny_llama_dir), config, tmp_path / "cpu", progress=False)
    _, on_gpu, cached = prepare(str(tiny_llama_dir), config, tmp_path / "cuda", False, "cuda")
    assert not cached
    for name in loaded.adapter.all_layer_names(loaded.model):
        cpu, gpu = on_cpu.layer(name), on_gpu.layer(name)
        for attribute in ("sq_norm", "xtx"):
            reference = getattr(cpu, attribute)
            difference = torch.linalg.norm(getattr(gpu, attribute) - reference)
            assert difference <= 1e-4 * torch.linalg.norm(reference), (name, attribute)
    torch.testing.assert_close(on_gpu.block_influence, on_cpu.block_influence, rtol=1e-3, atol=1e-6)


def test_sequential_pruning_on_cuda_gives_the_cpu_model(tiny_llama_dir, data_dir, tmp_path) -> None:
    config = CalibrationConfig(source=str(data_dir), n_samples=16, seq_len=64)
    loaded, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path, progress=False)
    windows = calibration_windows(config.source, loaded.tokenizer, 16, 64, 0)
    plan = PlanRequest("sparsegpt", 0.6).build(loaded, stats)
    on_cpu = prune_sequentially(load_model(str(tiny_llama_dir)), windows, plan, progress=False)
    on_gpu = prune_sequentially(load_model(str(tiny_llama_dir)), windows, plan, "cuda", progress=False)
    for name in plan.layers:
        cpu, gpu = on_cpu.get_submodule(name).weight, on_gpu.get_submodule(name).weight
        assert gpu.device.type == "cpu"  # blocks visit the device and go home
        assert torch.equal((gpu != 0).sum(dim=1), (cpu != 0).sum(dim=1)), name
        assert ((gpu != 0) == (cpu != 0)).float().mean() > 0.99, name


@pytest.mark.parametrize(("method", "objective"), [("wanda", "ppl"), ("sparsegpt", "kl")])
def test_a_search_on_cuda_records_what_the_cpu_records(
    tiny_llama_dir, data_dir, tmp_path, method: str, objective: str
) -> None:
    """The baselines (uniform and OWL at three targets): the same plans on either device."""
    trials = {}
    for device in ("cpu", "cuda"):
        (tmp_path / device).mkdir()
        config = tiny_config(
            tiny_llama_dir, data_dir, tmp_path / device, trials=6, method=method,
            objective=objective, device=device,
        )
        run_search(config, progress=False)
        study = optuna.load_study(study_name=config.study, storage=config.storage)
        trials[device] = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials["cpu"]) == len(trials["cuda"]) == 6
    for cpu, gpu in zip(trials["cpu"], trials["cuda"], strict=True):
        assert gpu.params == cpu.params and gpu.user_attrs["plan"] == cpu.user_attrs["plan"]
        assert gpu.user_attrs["size"] == cpu.user_attrs["size"]
        assert gpu.values[1] == pytest.approx(cpu.values[1], rel=2e-3)


@pytest.mark.parametrize("flags", [["--method", "wanda"], ["--method", "sparsegpt", "--sequential"]])
def test_prune_on_cuda_saves_the_cpu_checkpoint(capsys, tiny_llama_dir, data_dir, tmp_path, flags) -> None:
    reports, weights = {}, {}
    for device in ("cpu", "cuda"):
        args = prune_args(tiny_llama_dir, data_dir, tmp_path / device, "--sparsity", "0.6", *flags)
        assert main([*args, "--device", device, "--cache-dir", str(tmp_path / f"cache-{device}")]) == 0
        reports[device] = json.loads(capsys.readouterr().out)
        weights[device] = AutoModelForCausalLM.from_pretrained(tmp_path / device).state_dict()
    assert reports["cuda"]["linear_nonzeros"] == reports["cpu"]["linear_nonzeros"]
    assert reports["cuda"]["ppl"] == pytest.approx(reports["cpu"]["ppl"], rel=0.01)
    if "wanda" in flags:  # no weight update: the very same checkpoint
        assert all(torch.equal(weights["cuda"][key], weights["cpu"][key]) for key in weights["cpu"])
    evaluated = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", "--model", str(tmp_path / "cuda"), "--data", str(data_dir), "--seq-len",
                     "32", "--eval-windows", "4", "--device", device, "--format", "json"]) == 0
        evaluated[device] = json.loads(capsys.readouterr().out)[0]
    assert evaluated["cuda"]["ppl"] == pytest.approx(evaluated["cpu"]["ppl"], rel=1e-3)
    assert evaluated["cuda"]["ppl"] == pytest.approx(reports["cuda"]["ppl"], rel=1e-3)


def test_a_refinement_on_cuda_walks_the_cpu_path(studied, tmp_path) -> None:
    """Ranked on sequential statistics too (a calibration pass on the device)."""
    folder, _ = studied
    trials = {}
    for device in ("cpu", "cuda"):
        copy = tmp_path / f"{device}.db"
        copy.write_bytes((folder / "s.db").read_bytes())
        config = studied.refine_config(
            storage=f"sqlite:///{copy}", generations=3, sequential_every=2, device=device
        )
        summary = refine_trial(config, progress=False)
        study = optuna.load_study(study_name=REFINE_STUDY, storage=config.storage)
        trials[device] = (summary, study.trials[summary.trial], study.trials[config.trial])
    (cpu, cpu_trial, parent), (gpu, gpu_trial, _) = trials["cpu"], trials["cuda"]
    assert gpu.accepted == cpu.accepted and trial_plan(gpu_trial) == trial_plan(cpu_trial)
    assert gpu_trial.values[0] == cpu_trial.values[0] == parent.values[0]
    assert gpu_trial.values[1] == pytest.approx(cpu_trial.values[1], rel=2e-3)


def test_subnet_cuts_read_from_the_database_go_to_the_models_device(tiny_llama_dir, data_dir, tmp_path):
    """A cut stored by one process comes back on the CPU; the next one's model is on the GPU."""
    from autoprune.plan import Plan
    from autoprune.pruner import Pruner
    from autoprune.structure import BlockWidths, Structure
    from autoprune.variants import VariantDatabase

    config = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    loaded, stats, _ = prepare(str(tiny_llama_dir), config, tmp_path / "cache", False, "cuda")
    loaded.model.to("cuda")  # as a search's worker on a GPU holds it
    plan = Plan(structure=Structure(every_block=BlockWidths(heads_per_group=1, ffn=96)))
    tokens = torch.arange(16, device="cuda").unsqueeze(0)
    first = Pruner(loaded, stats, VariantDatabase(stats, tmp_path / "db")).subnet(plan)
    database = VariantDatabase(stats, tmp_path / "db")
    again = Pruner(loaded, stats, database).subnet(plan)
    assert database.counters.read and database.counters.written == 0
    assert {p.device.type for p in again.parameters()} == {"cuda"}
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, first(tokens).logits)


def test_a_heal_on_cuda_follows_the_cpu_heal_and_keeps_zeros(tiny_llama_dir, data_dir) -> None:
    from autoprune.training import HealConfig, heal

    config = HealConfig(tokens=4 * 2 * 16, seq_len=16, batch_size=2, lr=3e-4, validation_windows=2,
                        evaluations=1, precision="fp32")
    teacher = load_model(str(tiny_llama_dir))

    def student():
        model = load_model(str(tiny_llama_dir)).model
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
        return model

    on_cpu, _ = heal(student(), teacher, str(data_dir), config, progress=False)
    on_gpu, result = heal(student(), teacher, str(data_dir), config, device="cuda", progress=False)
    assert result.peak_memory_bytes > 0
    for name, tensor in on_cpu.state_dict().items():
        assert torch.allclose(tensor, on_gpu.state_dict()[name].cpu(), atol=1e-4), name
    up = on_gpu.model.layers[0].mlp.up_proj.weight[:, ::2]
    assert torch.equal(up, torch.zeros_like(up))
    bf16 = config.model_copy(update={"precision": "bf16"})
    _, mixed = heal(student(), teacher, str(data_dir), bf16, device="cuda", progress=False)
    assert mixed.measurements[-1].kl < mixed.measurements[0].kl * 10  # trains, in bf16 autocast, without blowing up


def test_a_structure_is_learned_on_cuda(tiny_llama_dir, data_dir) -> None:
    from autoprune.training import HealConfig, learn_structure

    config = HealConfig(tokens=8 * 4 * 16, seq_len=16, batch_size=4, validation_windows=2, evaluations=1)
    learned = learn_structure(load_model(str(tiny_llama_dir)), str(data_dir), 0.25, config, device="cuda",
                              progress=False)
    assert 0.74 <= learned.kept <= 0.76
    assert next(learned.model.parameters()).is_cuda
