"""A search that finishes by refining chosen front members (``refine_targets``): which members,
what the study holds afterwards, that a second run refines nothing again, and the settings it
refuses in one line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import run_cli, tiny_config
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from autoprune.cli import build_parser
from autoprune.cli._common import given_field_flags
from autoprune.errors import AutopruneError
from autoprune.plan import LayerSpec
from autoprune.study import SearchConfig, front_trials, load_existing_study, member_at, refine_trial, run_search
from autoprune.variants import level_key


def _trial(number: int, sparsity: float, ppl: float, **attrs) -> optuna.trial.FrozenTrial:
    trial = create_trial(
        values=[1.0 - sparsity, ppl], params={"target": sparsity},
        distributions={"target": FloatDistribution(0.0, 1.0)},
        user_attrs={"size": {"sparsity": sparsity}, **attrs},
    )
    trial.number = number
    return trial


def test_the_parent_is_the_least_sparse_front_member_at_or_above_the_target():
    trials = [
        _trial(0, 0.50, 10.0),
        _trial(1, 0.61, 14.0),
        _trial(2, 0.60, 13.0),
        _trial(3, 0.60, 15.0),  # dominated by trial 2
        _trial(4, 0.70, 20.0),
        _trial(5, 0.61, 11.0, refined_from=1),  # a refinement: never a parent, never dominates
    ]
    assert member_at(trials, 0.6, searched_only=True).number == 2
    assert member_at(trials, 0.605, searched_only=True).number == 1
    assert member_at(trials, 0.65, searched_only=True).number == 4
    assert member_at(trials, 0.71, searched_only=True) is None
    # what a user exports counts refinements: trial 5 dominates trials 1 and 2
    assert member_at(trials, 0.6).number == member_at(trials, 0.605).number == 5
    assert member_at(trials, 0.65).number == 4


def test_a_search_refines_its_chosen_members_once(tiny_llama_dir, data_dir, tmp_path):
    config = tiny_config(
        tiny_llama_dir, data_dir, tmp_path, method="sparsegpt", trials=4, database=True,
        refine_targets=[0.45, 0.5], refine_method="admm", refine_generations=2, refine_offspring=2,
        refine_select_windows=1, refine_sequential=[0.5],
    )
    summary = run_search(config, progress=False)
    study = load_existing_study(config.storage, config.study)
    refined = [t for t in study.get_trials(deepcopy=False) if "refined_from" in t.user_attrs]
    parents = {member_at(study.get_trials(deepcopy=False), t, searched_only=True).number for t in config.refine_targets}
    assert {t.user_attrs["refined_from"] for t in refined} == parents
    # only the member refined for 0.5 was also measured pruned block after block
    sequential = member_at(study.get_trials(deepcopy=False), 0.5, searched_only=True).number
    for trial in refined:
        measured = trial.user_attrs["refined_from"] == sequential
        assert ("sequential" in trial.user_attrs) == measured == trial.user_attrs["refine"]["measure_sequential"]
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["plan_summary"]["method"] == "admm"
               for t in refined)
    assert len(summary.refined) == len(parents)
    assert {row["trial"] for row in summary.front} == {t.number for t in front_trials(study)}
    again = run_search(config, progress=False)
    assert len(load_existing_study(config.storage, config.study).get_trials(deepcopy=False)) == len(
        study.get_trials(deepcopy=False)
    )
    assert all("already refined" in line for line in again.refined)


def test_refinement_keeps_its_off_grid_counts_in_the_database(studied):
    config = studied.refine_config(generations=3, database=True, method="admm")
    refine_trial(config, progress=False)
    entries = sorted((studied.folder / "cache" / "variants").rglob("admm/*/p*.safetensors"))
    # the tiny model's layers read 64 inputs, down_proj 128; grid 32 holds every 2nd / 4th count
    off_grid = [
        path for path in entries
        if level_key(LayerSpec(sparsity=int(path.stem[1:]) / (128 if "down_proj" in path.parent.name else 64)),
                     128 if "down_proj" in path.parent.name else 64, config.database_grid) is None
    ]
    assert entries and off_grid


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"refine_targets": [0.9]}, "refine_targets must lie inside sparsity_range"),
        ({"space": "subnet", "refine_method": "admm", "sparsity_range": (0.1, 0.4)}, "refine_method"),
        ({"refine_offspring": 1}, "refine_offspring"),
        ({"refine_targets": [0.6], "refine_sequential": [0.7]}, "refine_sequential must name targets"),
        ({"space": "subnet", "sparsity_range": (0.1, 0.4), "refine_targets": [0.3], "refine_sequential": [0.3]},
         "refine_sequential"),
    ],
)
def test_bad_finishing_settings_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(AutopruneError, match=message) as error:
        SearchConfig.load(None, {"storage": f"sqlite:///{tmp_path / 's.db'}", **overrides})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "s.db").exists()


def test_the_cli_refuses_a_target_outside_the_range_before_writing(tiny_llama_dir, data_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "search", "--model", tiny_llama_dir, "--data", data_dir, "--storage",
                           f"sqlite:///{tmp_path / 's.db'}", "--refine-targets", "0.95")
    assert code == 2 and err.strip().count("\n") == 0 and "refine_targets" in err
    assert not (tmp_path / "s.db").exists()


MAIN_JOB = Path(__file__).parents[1] / "configs" / "smollm2-default.yaml"


def test_the_main_jobs_finish_is_what_flags_alone_get():
    """The main job's file spells out its database and finishing keys; a search started without
    a file, on the same range, gets the same values from the defaults."""
    main_job = SearchConfig.load(MAIN_JOB, {})
    from_flags = SearchConfig.load(None, {"sparsity_range": main_job.sparsity_range})
    keys = ("method", "population", "eval_windows", "database", "database_grid", "refine_targets",
            "refine_method", "refine_generations", "refine_offspring", "refine_select_windows",
            "refine_sequential")
    assert {key: getattr(from_flags, key) for key in keys} == {key: getattr(main_job, key) for key in keys}
    assert main_job.database and main_job.refine_targets and main_job.refine_sequential


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (True, [0.6, 0.7], "admm", [0.7])),
        (["--sparsity-range", "0.3", "0.65"], (True, [0.6], "admm", [])),  # targets outside left out
        (["--sparsity-range", "0.2", "0.5"], (True, [], "admm", [])),
        (["--refine-targets"], (True, [], "admm", [])),  # the flag alone: no refinement
        (["--refine-targets", "0.55", "--refine-method", "wanda"], (True, [0.55], "wanda", [])),
        (["--space", "nm"], (True, [], None, [])),  # no unstructured allocation to move
        (["--space", "depth"], (True, [], None, [])),
        (["--space", "subnet"], (True, [], None, [])),  # refined on its widths
        (["--executor", "ray"], (True, [], "admm", [])),  # a refinement would run on the driver
        (["--executor", "ray", "--refine-targets", "0.6"], (True, [0.6], "admm", [])),
        (["--database", "false"], (False, [0.6, 0.7], "admm", [0.7])),
    ],
)
def test_finishing_defaults_follow_the_space_and_the_range(flags, expected):
    args = build_parser().parse_args(["search", *flags])
    config = SearchConfig.load(None, given_field_flags(args, SearchConfig))
    assert (config.database, config.refine_targets, config.refine_method, config.refine_sequential) == expected


def test_a_search_from_flags_alone_finishes_as_the_main_job_does(tiny_llama_dir, data_dir, tmp_path, capsys):
    """No config file, no database or refine flag: the trials are assembled from the database and
    the members at 60% and 70% refined with ADMM, the 70% one also measured block after block."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    code, _, err = run_cli(
        capsys, "search", "--model", tiny_llama_dir, "--data", data_dir, "--storage", storage,
        "--study", "flags", "--trials", 6, "--population", 4, "--seeded", "false",
        "--sparsity-range", 0.5, 0.75, "--eval-windows", 3, "--min-windows", 1, "--seq-len", 32,
        "--calib-samples", 8, "--cache-dir", tmp_path / "cache", "--refine-generations", 1,
        "--refine-offspring", 2, "--refine-select-windows", 1, "--format", "json",
    )
    assert code == 0, err
    trials = load_existing_study(storage, "flags").get_trials(deepcopy=False)
    parents = {target: member_at(trials, target, searched_only=True).number for target in (0.6, 0.7)}
    refined = {t.user_attrs["refined_from"]: t for t in trials if "refined_from" in t.user_attrs}
    assert set(refined) == set(parents.values())
    assert all(t.user_attrs["plan_summary"]["method"] == "admm" for t in refined.values())
    assert "sequential" in refined[parents[0.7]].user_attrs  # (on random weights one parent may serve both)
    assert list((tmp_path / "cache" / "variants").rglob("sparsegpt/*/*.safetensors"))  # trials read it
