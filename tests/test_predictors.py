"""The accuracy predictor on the tiny LLaMA: features and their schema, refusals for other models,
save/reload across processes, the quality report, screening inside the search, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest
from conftest import TRIALS_ONLY_FLAGS, copy_search, run_cli, tiny_config
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from autoprune import CalibrationConfig, prepare
from autoprune.errors import AutopruneError
from autoprune.plan import LayerSpec, NMPattern, Plan
from autoprune.study import SearchConfig, load_existing_study, run_search, trial_plan, trial_row
from predictors import (
    SCREEN_FACTOR,
    CandidateSampler,
    Featurizer,
    Predictor,
    PredictorProposer,
    default_predictor_path,
    quality_report,
    report_rows,
    study_featurizer,
    training_set,
)
from predictors.model import KEPT_FEATURE, Baseline, meta_path_of
from predictors.quality import domination_counts, front_top_quartile
from predictors.screening import MIN_CANDIDATES, parent_weights
from search_spaces import SearchSpace, SpaceContext

STUDY = "tiny"


def predictor_config(model_dir, data_dir, folder, **overrides) -> SearchConfig:
    """A seeded layer-wise Wanda study long enough to train a predictor on, never stopping early."""
    settings = dict(study=STUDY, trials=30, seeded=True, eval_windows=2, early_stop_margin=None)
    return tiny_config(model_dir, data_dir, folder, **{**settings, **overrides})


@pytest.fixture(scope="module")
def searched_source(tiny_llama_dir, data_dir, tmp_path_factory):
    """A finished layer-wise study and the featurizer of its model, built once for the module."""
    folder = tmp_path_factory.mktemp("predictor")
    config = predictor_config(tiny_llama_dir, data_dir, folder)
    run_search(config, progress=False)
    study = load_existing_study(config.storage, STUDY)
    return config, study_featurizer(study, folder / "cache"), folder


@pytest.fixture
def searched(searched_source, tmp_path):
    """This test's own copy of the study's folder (predictors a test fits land there), the study
    in it, and the shared featurizer."""
    config, featurizer, folder = searched_source
    copy = tmp_path / "predictor"
    config = copy_search(folder, copy, config)
    return config, load_existing_study(config.storage, STUDY), featurizer, copy


def uniform(featurizer: Featurizer, spec: LayerSpec, removed: list[int] | None = None) -> Plan:
    return Plan(layers={name: spec for name in featurizer.ctx.layers}, removed_blocks=removed or [])


def column(featurizer: Featurizer, row: np.ndarray, name: str) -> float:
    return float(row[featurizer.names.index(name)])


def test_features_describe_structure_and_importance(searched):
    _, study, featurizer, _ = searched
    data = training_set(study, featurizer)
    assert data.features.shape == (len(data), len(featurizer.names)) and np.isfinite(data.features).all()
    assert len(set(featurizer.names)) == len(featurizer.names) == 4 * (7 * 2 + 3) + 7
    assert data.features.std(axis=0).max() > 0  # the study's plans differ in their features
    low, high = featurizer.transform([uniform(featurizer, LayerSpec(sparsity=s)) for s in (0.3, 0.6)])
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for block in range(featurizer.ctx.num_blocks):
        for projection in projections:
            assert column(featurizer, low, f"block{block}.{projection}.sparsity") == pytest.approx(0.3, abs=0.02)
            mass = [column(featurizer, row, f"block{block}.{projection}.mass_removed") for row in (low, high)]
            assert 0 < mass[0] < mass[1] < 0.6  # Wanda removes the lowest scores first
    assert column(featurizer, high, "model.kept_fraction") == pytest.approx(0.4, abs=0.02)
    attention, mlp = (column(featurizer, high, f"model.{kind}.mass_removed") for kind in ("attention", "mlp"))
    assert 0 < attention < 0.6 and 0 < mlp < 0.6 and attention != mlp
    # One projection pruned: only its columns (and the aggregates) move.
    name = next(iter(featurizer.ctx.layers))  # block 0's q_proj
    dense, single = featurizer.transform([Plan(), Plan(layers={name: LayerSpec(sparsity=0.5)})])
    changed = {featurizer.names[i] for i in np.flatnonzero(single != dense)}
    assert changed == {"block0.self_attn.q_proj.sparsity", "block0.self_attn.q_proj.mass_removed",
                       "model.kept_fraction", "model.mass_removed", "model.attention.mass_removed",
                       "model.max_block_mass_removed"}
    removed, nm = featurizer.transform([
        uniform(featurizer, LayerSpec(), removed=[1]),
        uniform(featurizer, LayerSpec(nm=NMPattern(n=2, m=4))),
    ])
    assert column(featurizer, removed, "block1.removed") == 1.0
    assert column(featurizer, removed, "block1.removed_influence") == featurizer.ctx.block_influence[1]
    assert column(featurizer, removed, "block1.mlp.up_proj.sparsity") == 1.0
    assert column(featurizer, removed, "block0.mlp.up_proj.sparsity") == 0.0
    assert column(featurizer, removed, "model.removed_blocks") == 1.0
    assert column(featurizer, nm, "block2.nm_share") == 1.0 and column(featurizer, low, "block2.nm_share") == 0.0
    assert column(featurizer, nm, "block2.mlp.down_proj.sparsity") == 0.5
    four_eight, = featurizer.transform([uniform(featurizer, LayerSpec(nm=NMPattern(n=4, m=8)))])
    two_four = column(featurizer, nm, "block2.mlp.down_proj.mass_removed")
    assert 0 < column(featurizer, four_eight, "block2.mlp.down_proj.mass_removed") <= two_four  # 4:8 is freer


def test_plans_and_predictors_of_other_models_are_refused(searched, tiny_opt_dir, data_dir, tmp_path):
    _, study, featurizer, _ = searched
    with pytest.raises(AutopruneError, match="model.layers.9.mlp.up_proj.*does not have"):
        featurizer.transform([Plan(layers={"model.layers.9.mlp.up_proj": LayerSpec(sparsity=0.5)})])
    with pytest.raises(AutopruneError, match="removes block 7, beyond .*4 blocks"):
        featurizer.transform([Plan(removed_blocks=[7])])
    predictor = Predictor.fit(training_set(study, featurizer), featurizer.schema)
    loaded, stats, _ = prepare(str(tiny_opt_dir), CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32), tmp_path)
    other = Featurizer.from_model(loaded, stats, SpaceContext.from_model(loaded, stats, "wanda", (0.3, 0.7), ()))
    plan = uniform(other, LayerSpec(sparsity=0.5))
    with pytest.raises(AutopruneError, match="number of decoder blocks 4 there, 3 here"):
        predictor.predict([plan], other)
    retrained = featurizer.schema.model_copy(update={"model_fingerprint": "0" * 16})
    with pytest.raises(AutopruneError, match="model fingerprint"):
        Predictor(predictor.booster, predictor.meta.model_copy(update={"features": retrained})).predict(
            [uniform(featurizer, LayerSpec(sparsity=0.5))], featurizer
        )
    with pytest.raises(AutopruneError, match="trained on wanda plans, not sparsegpt"):
        predictor.predict([Plan(method="sparsegpt")], featurizer)


@pytest.mark.slow
def test_a_saved_predictor_predicts_identically_in_another_process(searched, tmp_path):
    config, study, featurizer, folder = searched
    predictor = Predictor.fit(training_set(study, featurizer), featurizer.schema)
    path = tmp_path / "p.predictor.json"
    meta = predictor.save(path)
    assert meta.name == "p.predictor.meta.json" and json.loads(meta.read_text())["features"]["num_blocks"] == 4
    assert json.loads(path.read_text())["learner"]  # xgboost's own JSON model format
    trials = [t for t in study.trials if "plan" in t.user_attrs]
    here = predictor.predict_quality([trial_plan(t) for t in trials], featurizer)
    assert np.array_equal(Predictor.load(path).predict_quality([trial_plan(t) for t in trials], featurizer), here)
    command = [sys.executable, "-m", "autoprune", "predictor", "predict", "--storage", config.storage,
               "--study", STUDY, "--predictor", str(path), "--cache-dir", str(folder / "cache"),
               "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout)
    assert [row["trial"] for row in rows] == [t.number for t in trials]
    assert [row["predicted_ppl"] for row in rows] == here.tolist()  # bit for bit


def test_the_quality_report_scores_both_objectives_on_unseen_trials(searched):
    _, study, featurizer, _ = searched
    data = training_set(study, featurizer)
    report = quality_report(data, featurizer.schema)
    assert report["trials"] == len(data) and report["heldout_trials"] == round(0.3 * len(data))
    assert set(report["heldout"]) == set(report["kfold"]) == {"regression", "ranking"}
    assert report["spearman"] == report["heldout"]["regression"]["spearman"]
    for metrics in report["heldout"].values():
        assert -1 <= metrics["spearman"] <= 1 and -1 <= metrics["kendall"] <= 1
        assert 0 <= metrics["front_top_quartile"] <= 1
    assert report["mape"] >= 0 and report["heldout"]["ranking"]["mape"] is None
    assert set(report["kfold"]["regression"]["spearman"]) == {"mean", "std"}
    assert len(report_rows(report)) == 4
    assert quality_report(data, featurizer.schema) == report  # seeded: the same numbers again
    with pytest.raises(AutopruneError, match="at least 10"):
        quality_report(data.subset(np.arange(6)), featurizer.schema)


def test_only_screening_learns_from_trials_stopped_early(searched):
    config, study, featurizer, _ = searched
    storage = optuna.storages.InMemoryStorage()
    optuna.copy_study(from_study_name=STUDY, from_storage=config.storage, to_storage=storage)
    copy = optuna.load_study(study_name=STUDY, storage=storage)
    finished = [t for t in copy.trials if t.state == optuna.trial.TrialState.COMPLETE]
    stopped = {**finished[0].user_attrs, "status": "stopped_early", "quality": 1e4, "windows": 1}
    copy.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED, params=finished[0].params,
        distributions=finished[0].distributions, user_attrs=stopped,
    ))
    reported = training_set(copy, featurizer)  # what fit and report learn from: full measurements
    assert len(reported) == len(finished) and reported.complete.all()
    assert reported.quality.tolist() == [t.values[1] for t in finished]
    other_method = {**finished[0].user_attrs, "plan": {**finished[0].user_attrs["plan"], "method": "admm"}}
    copy.add_trial(optuna.trial.create_trial(  # as `refine --method admm` adds one: not the study's method
        state=optuna.trial.TrialState.COMPLETE, params=finished[0].params, values=[1.0, 1.0],
        distributions=finished[0].distributions, user_attrs=other_method,
    ))
    assert len(training_set(copy, featurizer)) == len(finished)
    screened = training_set(copy, featurizer, stopped_early=True)
    assert len(screened) == len(finished) + 1 and screened.complete.tolist() == [True] * len(finished) + [False]
    assert screened.quality[-1] == 1e4
    assert screened.nonzeros[-1] == finished[0].user_attrs["size"]["linear_nonzeros"]


def test_front_recall_and_domination_counts_on_a_known_set():
    nonzeros = np.array([1.0, 2.0, 3.0, 4.0, 2.0, 3.0, 4.0, 5.0])
    measured = np.array([9.0, 5.0, 3.0, 1.0, 8.0, 6.0, 7.0, 9.0])  # front: the first four
    assert domination_counts(nonzeros, measured).tolist() == [0, 0, 0, 0, 1, 2, 4, 7]
    assert front_top_quartile(nonzeros, measured, measured) == 0.5  # top quarter = 2 of 8
    shuffled = np.array([9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0])
    assert front_top_quartile(nonzeros, measured, shuffled) == 0.25


def test_the_baseline_fits_model_wide_features_and_stays_in_its_range(searched):
    names = (KEPT_FEATURE, "model.mass_removed", "block0.noise")
    rng = np.random.default_rng(0)
    features = np.column_stack([np.linspace(0.2, 0.6, 40), rng.uniform(0, 1, 40), rng.normal(size=40)])
    log_quality = 2.0 - 3.0 * features[:, 0] + 4.0 * features[:, 0] ** 3 + 1.5 * features[:, 1]
    baseline = Baseline.fit(features, names, log_quality)
    assert baseline.columns == [KEPT_FEATURE, "model.mass_removed"]  # per-block columns left to the trees
    fitted = baseline(features, names)
    assert np.corrcoef(fitted, log_quality)[0, 1] > 0.99
    outside = features[:2].copy()
    outside[:, 0] = [0.0, 1.0]
    inside = features[:2].copy()
    inside[:, 0] = [0.2, 0.6]
    assert np.allclose(baseline(outside, names), baseline(inside, names))  # held to its range
    _, study, featurizer, _ = searched
    data = training_set(study, featurizer)
    predictor = Predictor.fit(data, featurizer.schema)
    assert predictor.meta.baseline == Baseline.fit(data.features, featurizer.names, data.log_quality)
    flat = predictor.meta.baseline.model_copy(update={"weights": [0.0] * len(predictor.meta.baseline.weights)})
    without = Predictor(predictor.booster, predictor.meta.model_copy(update={"baseline": flat}))
    assert not np.allclose(without.scores(data.features), predictor.scores(data.features))


def test_candidates_stay_inside_their_distributions_and_inherit_from_parents():
    distributions = {
        "f": FloatDistribution(0.4, 0.8, step=0.01),
        "log": FloatDistribution(1e-3, 1.0, log=True),
        "i": IntDistribution(0, 5),
        "c": CategoricalDistribution(["dense", "2:4"]),
    }
    sampler = CandidateSampler(distributions, np.random.default_rng(0))
    parents = [{"f": 0.8, "log": 1.0, "i": 5, "c": "2:4"}, {"f": 0.4, "log": 1e-3, "i": 0, "c": "dense"}]
    drawn = sampler.uniform(200) + sampler.offspring(parents, 200, 0.5, rate=1.0)
    for params in drawn:
        assert all(d._contains(d.to_internal_repr(params[name])) for name, d in distributions.items())
        assert abs(params["f"] * 100 - round(params["f"] * 100)) < 1e-9
    assert {p["c"] for p in drawn} == {"dense", "2:4"} and len({p["i"] for p in drawn}) == 6
    crossed = sampler.offspring(parents, 200, 0.5, rate=0.0)  # no mutation: every value a parent's
    assert all(child[name] in (parents[0][name], parents[1][name]) for child in crossed for name in child)
    mixed = [child for child in crossed if child not in parents]
    assert 20 < len(mixed) < 80  # a quarter of the children have two parents, and most of those mix
    assert all(child == parents[0] for child in sampler.offspring(parents[:1], 20, 0.5, rate=0.0))


def test_front_members_with_more_exclusive_hypervolume_are_likelier_parents():
    front = np.array([[0.2, 6.5], [0.3, 5.0], [0.31, 4.99], [0.6, 3.3]])  # (kept, log-quality)
    weights = parent_weights(front, worst=12.0)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0.5 / len(front)).all()
    assert weights.argmax() == 0  # the sparse end beats everything up to the worst measured
    assert weights[2] < weights[1]  # a point just beside another adds little of its own
    assert weights[3] < 0.2  # the dense end's box stops just beyond it: near the uniform floor


@pytest.mark.slow
def test_screening_picks_from_many_candidates_and_records_predictions(tiny_llama_dir, data_dir, tmp_path):
    config = predictor_config(tiny_llama_dir, data_dir, tmp_path, trials=22)
    space = SearchSpace.named(config.space)
    calibration = config.calibration()
    loaded, stats, _ = prepare(config.model, calibration, tmp_path / "cache", False)
    ctx = SpaceContext.from_model(loaded, stats, config.method, config.sparsity_range)
    proposer = PredictorProposer(
        space, ctx, Featurizer.from_model(loaded, stats, ctx), space.distributions(ctx),
        config.population, min_candidates=30,
    )
    summary = run_search(config, proposer=proposer, progress=False)
    study = load_existing_study(config.storage, STUDY)
    warmup = proposer.warmup(study.trials)
    assert warmup == len(space.baselines(ctx, config.targets)) + len(space.seeds(ctx, config.targets)) + 4
    proposed = [t for t in study.trials if t.user_attrs.get("proposed")]
    numbers = [t.number for t in proposed]  # from the end of the warm-up on, every trial
    assert numbers == list(range(numbers[0], config.trials)) and numbers[0] >= warmup
    assert len(numbers) == len(proposer.rounds) >= 4
    trained = [r["trained_on"] for r in proposer.rounds]
    assert trained == sorted(trained) and trained[-1] > trained[0] >= warmup  # refits as trials finish
    for trial, screening in zip(proposed, proposer.rounds, strict=True):
        assert screening["screened"] >= SCREEN_FACTOR * screening["picked"]
        assert trial.user_attrs["screened"] == screening["screened"]
        assert trial.user_attrs["predicted_ppl"] > 0 and trial.user_attrs["screen_pick"]
    for row in summary.front:  # the front is measured values only
        trial = study.trials[row["trial"]]
        assert row["ppl"] == trial.values[1] == trial.user_attrs["ppl"] and "predicted_ppl" not in row
    assert "predicted_ppl" not in trial_row(proposed[0])


@pytest.mark.slow
def test_search_flag_turns_screening_on(tiny_llama_dir, data_dir, tmp_path, capsys, monkeypatch):
    config = predictor_config(tiny_llama_dir, data_dir, tmp_path, trials=20)

    def second_copy(*args, **kwargs):
        raise AssertionError("the proposer loaded a second copy of the model")

    # In process, the proposer's features come from the worker's model.
    monkeypatch.setattr("predictors.screening._proposer.prepare", second_copy)
    flags = [f"--{key.replace('_', '-')}" for key in ("model", "data", "storage", "study", "space",
                                                      "method", "cache_dir")]
    values = [getattr(config, key) for key in ("model", "data", "storage", "study", "space", "method",
                                               "cache_dir")]
    code, _, err = run_cli(
        capsys, "search", *[part for pair in zip(flags, values, strict=True) for part in pair],
        "--trials", 20, "--population", 4, "--sparsity-range", 0.3, 0.7, "--eval-windows", 2,
        "--min-windows", 1, "--seq-len", 32, "--calib-samples", 8, "--predictor", "on", "--format", "json", *TRIALS_ONLY_FLAGS,
    )
    assert code == 0, err
    study = load_existing_study(config.storage, STUDY)
    proposed = [t for t in study.trials if t.user_attrs.get("proposed")]
    assert proposed and all(t.user_attrs["screened"] >= MIN_CANDIDATES for t in proposed)
    code, _, err = run_cli(capsys, "search", "--predictor", "maybe")
    assert code == 2 and err.count("\n") == 1 and "--predictor" in err


def test_cli_fit_report_predict_and_bad_input(searched, tmp_path, capsys):
    config, study, featurizer, folder = searched
    common = ["--storage", config.storage, "--study", STUDY, "--cache-dir", folder / "cache"]
    code, out, err = run_cli(capsys, "predictor", "fit", *common, "--format", "json")
    assert code == 0, err
    fitted = json.loads(out)[0]
    path = default_predictor_path(config.storage, STUDY)
    assert fitted["predictor"] == str(path) == str(folder / f"study.{STUDY}.predictor.json")
    assert path.is_file() and fitted["trials"] == len(training_set(study, featurizer))

    code, out, err = run_cli(capsys, "predictor", "report", *common, "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert isinstance(report["spearman"], float) and {"kendall", "mape", "front_top_quartile"} <= report.keys()
    code, out, _ = run_cli(capsys, "predictor", "report", *common)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["split", "objective", "spearman"]

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(trial_plan(study.trials[0]).to_json())
    code, out, err = run_cli(capsys, "predictor", "predict", *common, "--plan", plan_file, "--format", "json")
    assert code == 0, err
    assert json.loads(out)[0]["plan"] == str(plan_file) and json.loads(out)[0]["predicted_ppl"] > 0

    foreign = tmp_path / "foreign.json"
    foreign.write_text(Plan(layers={"model.layers.29.mlp.up_proj": LayerSpec(sparsity=0.5)}).to_json())
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not: [valid")
    broken = tmp_path / "broken.predictor.json"  # valid metadata beside a file that is no booster
    broken.write_text("{}")
    meta_path_of(broken).write_text(meta_path_of(path).read_text())
    mismatched = tmp_path / "mismatched.predictor.json"  # a booster beside another one's metadata
    mismatched.write_text(path.read_text())
    meta = json.loads(meta_path_of(path).read_text())
    meta["features"]["names"] = meta["features"]["names"][:-1]
    meta_path_of(mismatched).write_text(json.dumps(meta))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"layers": {"x": {"sparsity": 2}}}))
    bad_inputs = {
        ("predictor", "fit", "--storage", config.storage, "--study", "nope"): "study 'nope' not found",
        ("predictor", "report", "--storage", tmp_path / "none.db", "--study", STUDY): "does not exist",
        ("predictor", "predict", *common, "--plan", foreign): "does not have",
        ("predictor", "predict", *common, "--plan", tmp_path / "missing.json"): "plan file not found",
        ("predictor", "predict", *common, "--plan", garbage): "not valid JSON/YAML",
        ("predictor", "predict", *common, "--plan", wrong): "is not a plan or recipe",
        ("predictor", "predict", *common, "--predictor", tmp_path / "absent.json"): "run fit first",
        ("predictor", "predict", *common, "--predictor", broken): "is not an xgboost model",
        ("predictor", "predict", *common, "--predictor", mismatched): "do not belong together",
        ("predictor", "fit", *common, "--out", tmp_path / "model.txt"): "saved as .json",
        ("predictor", "frobnicate"): "invalid choice",
    }
    for args, message in bad_inputs.items():
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and not out and err.count("\n") == 1 and message in err, (args, err)
    assert len(optuna.load_study(study_name=STUDY, storage=config.storage).trials) == len(study.trials)
