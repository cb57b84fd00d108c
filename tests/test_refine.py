"""`autoprune refine`: level switches keep a plan's exact size, kept layers equal a fresh prune,
selection keeps the fitter of parent and offspring, a stopped refinement resumes exactly, and the
refined trial joins the study where `front` and `export` treat it like any other; bad input is one
line with the study untouched."""

from __future__ import annotations

import hashlib
import json
import math
import random

import optuna
import pytest
import torch
import yaml
from conftest import REFINE_STUDY, run_cli
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.data import validation_windows
from autoprune.measure import measure_size, perplexity
from autoprune.methods import prune_count
from autoprune.models import ArchitectureAdapter, load_model
from autoprune.pruner import prune_sequentially
from autoprune.structure import BlockWidths, Structure
from autoprune.plan import LayerSpec, NMPattern, Plan
from autoprune.errors import AutopruneError
from autoprune.study import (
    TrialRequest,
    TrialWorker,
    WorkerSpec,
    refine_trial,
    trial_plan,
    trial_row,
)
from autoprune.study.refine import (
    CHECKPOINT_PREFIX,
    PATH_SETTINGS,
    Allocation,
    EvolutionState,
    LevelSwitchEvolution,
    checkpoint_key,
    refinable_layers,
)

STUDY = REFINE_STUDY
#: SmolLM2's decoder linear shapes (rows, columns): q/o, k/v, gate/up, down.
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def removed_by_plan(allocation: Allocation) -> int:
    layers = allocation.plan(Plan(method="sparsegpt")).layers
    return sum(SHAPES[name][0] * prune_count(spec.sparsity, SHAPES[name][1]) for name, spec in layers.items())


def test_level_switches_keep_the_exact_size_and_the_ranges():
    start = {name: cols // 2 for name, (_, cols) in SHAPES.items()}
    parent = Allocation(start, SHAPES, step=0.025)
    rng = random.Random(0)
    child = parent
    for _ in range(300):
        child = child.mutated(rng, 3)
        assert child.removed() == parent.removed()
        assert all(0 <= count <= child.cap(name) for name, count in child.counts.items())
    assert child.counts != start and parent.counts == start
    # the plan prunes exactly those counts, so the model has exactly that size
    assert removed_by_plan(child) == parent.removed()
    # a switch between a wide and a narrow layer moves whole rows of both, the smaller ~step
    move = parent.switch("k", "down")
    assert move.more_per_row * 192 == move.fewer_per_row * 576
    assert move.more_per_row / 576 == pytest.approx(0.025, abs=0.005)


def test_no_switch_leaves_a_layer_out_of_range():
    cap = Allocation({}, SHAPES, 0.025).cap("o")
    one_way = Allocation({"q": 0, "o": cap}, SHAPES, 0.025)
    assert one_way.switch("o", "q") is None  # o is at its cap and q has nothing to give
    assert one_way.switch("q", "o") is not None
    for counts in ({"q": 0, "o": 0}, {"q": cap, "o": cap}):
        stuck = Allocation(counts, SHAPES, 0.025)
        assert stuck.mutated(random.Random(0), 5).counts == counts


def worker_for(studied) -> TrialWorker:
    folder, config = studied
    return TrialWorker(WorkerSpec(model=config.model, calibration=config.calibration(), objective="kl",
                                  eval_seq_len=32, eval_windows=3, cache_dir=str(folder / "cache")))


def with_structure(plan: Plan) -> Plan:
    """``plan`` with block 1 removed and one layer at 2:4: neither is refined, both must survive."""
    layers = dict(plan.layers)
    name = next(name for name in layers if name.startswith("model.layers.2.") and "up_proj" in name)
    layers[name] = LayerSpec(nm=NMPattern(n=2, m=4))
    return plan.model_copy(update={"layers": layers, "removed_blocks": [1]})


@pytest.mark.parametrize("structured", [False, True])
def test_kept_layers_are_what_a_fresh_prune_gives(studied, structured):
    config = studied.refine_config()
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    base = trial_plan(study.trials[config.trial])
    base = with_structure(base) if structured else base
    worker = worker_for(studied)
    evolution = LevelSwitchEvolution(worker, base, config)
    refinable = refinable_layers(base, worker.pruner)
    allocation = Allocation(refinable, worker.pruner.layer_shapes(), 0.1)
    if structured:
        assert not any(".1." in name or "up_proj" in name and ".2." in name for name in refinable)
    for seed in range(3):
        child = allocation.mutated(random.Random(seed), 4)
        kept = evolution._weights(child)
        plan = child.plan(base)
        fresh = worker.pruner.pruned_weights(plan)
        assert kept.keys() == fresh.keys()
        for name in kept:
            assert kept[name].equal(fresh[name]), name
        assert plan.removed_blocks == base.removed_blocks
    # the pool of ranking windows leaves out the study's own windows
    assert not any(window.equal(own) for window in evolution.pool for own in worker.windows)


def test_selection_keeps_the_fitter_of_parent_and_offspring(studied, monkeypatch):
    """With a fitness that only depends on the allocation (sparsity pushed to the first layer is
    good), every generation's winner is at least as fit as the last, and the parent is kept
    when no offspring beats it."""
    config = studied.refine_config(generations=30)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    base = trial_plan(study.trials[config.trial])
    evolution = LevelSwitchEvolution(worker_for(studied), base, config)
    first = next(iter(refinable_layers(base, evolution.pruner)))
    monkeypatch.setattr(evolution, "_fitness", lambda a, windows, tokens: -a.counts[first])
    final = evolution.run()
    start = refinable_layers(base, evolution.pruner)[first]
    assert final.history == sorted(final.history, reverse=True) and len(final.history) == 30
    assert 0 < final.accepted < 30 and final.generation == 30
    assert final.counts[first] == -final.history[-1] > start


def test_sequential_ranking_prunes_the_parent_as_prune_sequentially_does(studied):
    """With ``sequential_every``, the parent is ranked on exactly the weights ``prune --sequential``
    gives its plan (a candidate on weights from the parent's statistics); the model stays dense
    between candidates, and statistics replaced by a refresh leave the cache."""
    folder, search = studied
    config = studied.refine_config(sequential_every=1)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    base = trial_plan(study.trials[config.trial])
    worker = worker_for(studied)
    dense = {name: weight.clone() for name, weight in worker.pruner.pruned_weights(Plan(method="sparsegpt")).items()}
    evolution = LevelSwitchEvolution(worker, base, config)
    evolution._use_statistics(evolution.start.counts, progress=False)
    ranked = evolution._weights(evolution.start)
    sequential = prune_sequentially(load_model(search.model), worker.calibration_windows, base, progress=False)
    for name, weight in ranked.items():
        torch.testing.assert_close(weight, sequential.get_submodule(name).weight.data, rtol=0, atol=1e-6)
    one_shot = worker.pruner.pruned_weights(base)
    assert any(not one_shot[name].equal(ranked[name]) for name in ranked if ".layers.0." not in name)
    for name, weight in dense.items():
        assert worker.loaded.model.get_submodule(name).weight.data.equal(weight), name
    first = evolution.pruner.stats.folder
    child = evolution.start.mutated(random.Random(0), 2)
    evolution._use_statistics(child.counts, progress=False)
    assert not first.exists() and evolution.pruner.stats.folder.is_dir()
    second = evolution.pruner.stats.folder
    evolution.release_statistics()
    assert not second.exists() and evolution.pruner is worker.pruner


def test_the_sequential_measurement_is_the_final_plans_own(studied):
    """The trial's ``--sequential`` measurement is made from the final allocation's own
    statistics, not those it was last ranked on (which differ once a switch touched an earlier
    block), on the study's windows. Run as a resumed refinement with no generation left does
    it, the checkpoint's statistics are deleted although that run never loaded them."""
    folder, search = studied
    config = studied.refine_config(sequential_every=5)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    base = trial_plan(study.trials[config.trial])
    worker = worker_for(studied)
    cached = set((folder / "cache" / "stats").iterdir())
    killed = LevelSwitchEvolution(worker, base, config)
    start = killed.start
    children = (start.mutated(random.Random(seed), 1) for seed in range(100))
    final = next(c for c in children if any(c.counts[n] != start.counts[n] for n in c.counts if ".layers.0." in n))
    killed._use_statistics(start.counts, progress=False)  # the statistics a killed run ranked on last
    with killed.pruner.applied(final.plan(base)) as model:
        stale_ppl = perplexity(model, worker.windows)

    resumed = LevelSwitchEvolution(worker, base, config)
    state = EvolutionState(generation=5, counts=final.counts, statistics_from=dict(start.counts))
    measured = resumed.measure_sequential(state, number=0)
    sequential = prune_sequentially(load_model(search.model), worker.calibration_windows,
                                    final.plan(base), progress=False)
    assert measured.ppl == pytest.approx(perplexity(sequential, worker.windows), rel=1e-5)
    assert measured.ppl != pytest.approx(stale_ppl, rel=1e-5)
    resumed.release_statistics()
    assert set((folder / "cache" / "stats").iterdir()) == cached


@pytest.mark.slow
@pytest.mark.parametrize(("sequential_every", "killed_at"), [(None, 2), (3, 3), (3, 2)])
def test_a_stopped_refinement_goes_on_where_it_stopped(studied, tmp_path, monkeypatch, sequential_every, killed_at):
    """Killed right after a generation's checkpoint and run again, a refinement ends exactly where
    an uninterrupted one does (with sequential statistics too: stopped where they are refreshed,
    or between refreshes) and leaves no statistics behind; a third run finds the trial instead of
    adding one, and asking for fewer generations than the checkpoint holds is refused."""
    folder, search = studied
    cached = set((folder / "cache" / "stats").iterdir())
    copies = {}
    for name in ("whole", "stopped"):
        copies[name] = tmp_path / f"{name}.db"
        copies[name].write_bytes((folder / "s.db").read_bytes())
    settings = dict(generations=4, seed=5, sequential_every=sequential_every)
    whole = refine_trial(studied.refine_config(storage=f"sqlite:///{copies['whole']}", **settings))
    config = studied.refine_config(storage=f"sqlite:///{copies['stopped']}", **settings)

    write = optuna.Study.set_user_attr

    def killed_after_second(study, key, value):
        write(study, key, value)
        if key.startswith(CHECKPOINT_PREFIX) and value["generation"] == killed_at:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(optuna.Study, "set_user_attr", killed_after_second)
        with pytest.raises(KeyboardInterrupt):
            refine_trial(config)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    trials_before = len(study.trials)
    assert not any(t.user_attrs.get("refine", {}).get("seed") == 5 for t in study.trials)

    resumed = refine_trial(config)
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    original = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{copies['whole']}")
    assert len(study.trials) == trials_before + 1 and not resumed.found
    assert trial_plan(study.trials[resumed.trial]) == trial_plan(original.trials[whole.trial])
    assert (resumed.accepted, resumed.fitness) == (whole.accepted, whole.fitness)
    assert set((folder / "cache" / "stats").iterdir()) == cached

    again = refine_trial(config)
    assert again.found and again.trial == resumed.trial
    assert len(optuna.load_study(study_name=STUDY, storage=config.storage).trials) == trials_before + 1
    with pytest.raises(AutopruneError, match="stopped at generation 4, past --generations 3"):
        refine_trial(config.model_copy(update={"generations": 3}))


@pytest.mark.slow
def test_refined_trial_joins_the_study_and_exports_like_any_other(capsys, studied, tmp_path):
    folder, config = studied
    settings = studied.refine_config()
    code, out, err = run_cli(
        capsys, "refine", "--storage", config.storage, "--study", STUDY, "--trial", settings.trial,
        "--generations", 6, "--offspring", 3, "--pool-windows", 6, "--screen-tokens", 16,
        "--cache-dir", folder / "cache", "--format", "json",
    )
    assert code == 0, err
    row = json.loads(out)[0]
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    parent, refined = study.trials[settings.trial], study.trials[row["trial"]]
    assert refined.state == TrialState.COMPLETE and refined.user_attrs["refined_from"] == parent.number
    assert refined.values[0] == parent.values[0]  # exactly the parent's size
    assert refined.params == parent.params
    assert refined.user_attrs["refine"]["generations"] == 6
    assert trial_plan(refined) != trial_plan(parent)
    assert math.isfinite(refined.values[1]) and refined.user_attrs["kl"] == refined.values[1]

    code, out, _ = run_cli(capsys, "front", "--storage", config.storage, "--study", STUDY, "--format", "json")
    on_front = {r["trial"] for r in json.loads(out)}
    assert (refined.number in on_front) == (refined.values[1] <= parent.values[1] or parent.number not in on_front)

    exported = tmp_path / "refined"
    code, out, _ = run_cli(capsys, "export", "--storage", config.storage, "--study", STUDY, "--trial",
                           refined.number, "--out", exported, "--cache-dir", folder / "cache", "--format", "json")
    assert code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    windows = validation_windows(config.data, AutoTokenizer.from_pretrained(exported), 32, 3)
    assert perplexity(reloaded, windows) == pytest.approx(refined.user_attrs["ppl"], rel=0.01)
    size = measure_size(reloaded, ArchitectureAdapter.for_model(reloaded))
    assert size.linear_nonzeros == parent.values[0]


def test_a_refinement_with_another_method_prunes_and_exports_with_it(capsys, studied, tmp_path):
    """``--method admm`` on a trial of a SparseGPT study: the refined trial's plan names ADMM, keeps
    the parent's size, and its export reloads to the quality the study recorded."""
    folder, config = studied
    settings = studied.refine_config(generations=2, method="admm")
    code, out, err = run_cli(
        capsys, "refine", "--storage", config.storage, "--study", STUDY, "--trial", settings.trial,
        "--generations", 2, "--offspring", 3, "--pool-windows", 6, "--screen-tokens", 16,
        "--method", "admm", "--cache-dir", folder / "cache", "--format", "json",
    )
    assert code == 0, err
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    parent, refined = study.trials[settings.trial], study.trials[json.loads(out)[0]["trial"]]
    assert trial_plan(parent).method == "sparsegpt" and trial_plan(refined).method == "admm"
    assert refined.values[0] == parent.values[0]
    assert refined.user_attrs["refine"]["method"] == "admm"
    worker = worker_for(studied)
    with_sparsegpt = trial_plan(refined).model_copy(update={"method": "sparsegpt"})
    # the study recorded ADMM's weights, not SparseGPT's on the same allocation
    assert worker.run(TrialRequest(0, with_sparsegpt)).quality != pytest.approx(refined.values[1], rel=1e-3)

    exported = tmp_path / "admm"
    code, _, err = run_cli(capsys, "export", "--storage", config.storage, "--study", STUDY, "--trial",
                           refined.number, "--out", exported, "--cache-dir", folder / "cache")
    assert code == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    windows = validation_windows(config.data, AutoTokenizer.from_pretrained(exported), 32, 3)
    assert perplexity(reloaded, windows) == pytest.approx(refined.user_attrs["ppl"], rel=0.01)
    assert measure_size(reloaded, ArchitectureAdapter.for_model(reloaded)).linear_nonzeros == parent.values[0]
    # a refinement without --method keeps the checkpoint key it had before the setting existed
    plain = studied.refine_config()
    path = json.dumps(plain.model_dump(include=PATH_SETTINGS - {"method"}), sort_keys=True)
    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    assert checkpoint_key(plain) == f"{CHECKPOINT_PREFIX}{plain.trial}:{digest}"
    assert checkpoint_key(settings) != checkpoint_key(studied.refine_config(generations=2))


def test_a_trial_refined_for_sequential_exports_as_prune_sequential_makes_it(capsys, studied, tmp_path):
    """A refinement with ``--sequential-every`` leaves no statistics behind. Exported with
    ``--one-shot``, its trial is the one-shot variant the study measured; with ``--sequential``
    it is exactly what ``prune --sequential`` makes of its plan, the recipe says sequential, and
    the trial's recorded sequential perplexity is that model's on the study's windows. Exported
    without either, it is the variant the study measured better (a note says when that is the
    sequential one)."""
    folder, config = studied
    settings = studied.refine_config()
    cached = set((folder / "cache" / "stats").iterdir())
    code, out, err = run_cli(
        capsys, "refine", "--storage", config.storage, "--study", STUDY, "--trial", settings.trial,
        "--generations", 3, "--offspring", 3, "--pool-windows", 6, "--screen-tokens", 16,
        "--sequential-every", 2, "--cache-dir", folder / "cache", "--format", "json",
    )
    assert code == 0, err
    assert set((folder / "cache" / "stats").iterdir()) == cached  # its statistics are gone
    refined = optuna.load_study(study_name=STUDY, storage=config.storage).trials[json.loads(out)[0]["trial"]]
    assert refined.user_attrs["refine"]["sequential_every"] == 2
    export = ["export", "--storage", config.storage, "--study", STUDY, "--trial", refined.number,
              "--cache-dir", folder / "cache", "--format", "json"]
    code, out, err = run_cli(capsys, *export, "--out", tmp_path / "one-shot", "--one-shot")
    assert code == 0 and "note" not in err
    assert json.loads(out)[0]["recorded_ppl"] == refined.user_attrs["ppl"]
    code, out, err = run_cli(capsys, *export, "--out", tmp_path / "sequential", "--sequential")
    assert code == 0 and "note" not in err
    recorded = refined.user_attrs["sequential"]["ppl"]
    assert json.loads(out)[0]["recorded_ppl"] == recorded != refined.user_attrs["ppl"]
    code, out, err = run_cli(capsys, *export, "--out", tmp_path / "default")
    better = refined.user_attrs["sequential"]["quality"] < refined.user_attrs["quality"]
    assert code == 0 and (f"exporting trial {refined.number} --sequential" in err) == better
    assert json.loads(out)[0]["recorded_ppl"] == (recorded if better else refined.user_attrs["ppl"])
    assert yaml.safe_load((tmp_path / "default" / "recipe.yaml").read_text())["sequential"] is better
    assert trial_row(refined)["ppl_sequential"] == recorded
    assert trial_row(optuna.load_study(study_name=STUDY, storage=config.storage).trials[settings.trial])["ppl_sequential"] is None
    assert yaml.safe_load((tmp_path / "sequential" / "recipe.yaml").read_text())["sequential"] is True
    expected = prune_sequentially(load_model(config.model), worker_for(studied).calibration_windows,
                                  trial_plan(refined), progress=False)
    one_shot = AutoModelForCausalLM.from_pretrained(tmp_path / "one-shot")
    sequential = AutoModelForCausalLM.from_pretrained(tmp_path / "sequential")
    names = [name for name, module in expected.named_modules() if ".layers.1." in name and hasattr(module, "weight") and module.weight.dim() == 2]
    for name in names:
        torch.testing.assert_close(sequential.get_submodule(name).weight, expected.get_submodule(name).weight, rtol=0, atol=1e-6)
    assert any(not one_shot.get_submodule(name).weight.equal(sequential.get_submodule(name).weight) for name in names)
    size = measure_size(sequential, ArchitectureAdapter.for_model(sequential))
    assert size.linear_nonzeros == refined.values[0]
    windows = validation_windows(config.data, AutoTokenizer.from_pretrained(tmp_path / "sequential"), 32, 3)
    assert perplexity(sequential, windows) == pytest.approx(recorded, rel=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trial", 999], "trial 999 is not in study"),
        (["--trial", "first"], "invalid trial"),
        (["--generations", 0], "invalid generations"),
        (["--trials", 3], "unrecognized arguments: --trials"),
        (["--study", "nope", "--trial", 0], "study 'nope' not found"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_study_alone(capsys, studied, args, message):
    folder, config = studied
    before = hashlib.sha256((folder / "s.db").read_bytes()).hexdigest()
    defaults = {"--study": STUDY, "--trial": 0}
    given = dict(zip(args[::2], args[1::2], strict=True))
    flags = [part for key, value in {**defaults, **given}.items() for part in (key, value)]
    code, _, err = run_cli(capsys, "refine", "--storage", config.storage, *flags)
    assert code == 2
    assert err.startswith("autoprune: error:") and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert hashlib.sha256((folder / "s.db").read_bytes()).hexdigest() == before


def test_measure_sequential_records_what_prune_sequential_makes_and_leaves_the_worker_dense(studied):
    """``measure_sequential`` ranks candidates one-shot, as a plain refinement does (same path, same
    one-shot measurement), then measures the result pruned block after block: its recorded
    sequential perplexity is ``prune_sequentially``'s model's on the study's windows, and the
    worker's model is dense again afterwards (a dense plan measures as before)."""
    folder, config = studied
    worker = worker_for(studied)
    dense = worker.run(TrialRequest(0, Plan(method="sparsegpt")))
    plain = refine_trial(studied.refine_config(generations=2, offspring=3, pool_windows=6, screen_tokens=16))
    measured = refine_trial(studied.refine_config(
        generations=2, offspring=3, pool_windows=6, screen_tokens=16, measure_sequential=True
    ))
    assert not plain.found and not measured.found and measured.trial != plain.trial
    study = optuna.load_study(study_name=STUDY, storage=config.storage)
    refined, other = study.trials[measured.trial], study.trials[plain.trial]
    assert trial_plan(refined) == trial_plan(other) and refined.values == other.values
    assert "sequential" not in other.user_attrs and refined.user_attrs["refine"]["measure_sequential"]
    expected = prune_sequentially(load_model(config.model), worker.calibration_windows, trial_plan(refined),
                                  progress=False)
    windows = validation_windows(config.data, AutoTokenizer.from_pretrained(config.model), 32, 3)
    assert perplexity(expected, windows) == pytest.approx(refined.user_attrs["sequential"]["ppl"], rel=1e-4)
    result = worker.run_sequential(TrialRequest(1, trial_plan(refined)))
    assert result.ppl == pytest.approx(refined.user_attrs["sequential"]["ppl"], rel=1e-4)
    assert worker.run(TrialRequest(2, Plan(method="sparsegpt"))).quality == dense.quality
    with pytest.raises(AutopruneError, match="sub-network"):
        worker.run_sequential(TrialRequest(3, Plan(structure=Structure(every_block=BlockWidths(ffn=8)))))
