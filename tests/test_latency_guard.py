"""A study priced by one latency table refuses latencies from another (a table measured again, or
another device's): the two would share one front without being comparable."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config
from optuna.trial import TrialState

from autoprune.errors import AutopruneError
from autoprune.study import RefineConfig, SearchConfig, load_existing_study, refine_trial, run_search


def test_a_study_refuses_latencies_priced_by_another_table(tiny_llama_dir, data_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, data_dir, tmp_path, space="subnet", sparsity_range=None, trials=3)
    run_search(config, progress=False)
    study = load_existing_study(config.storage, config.study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    recorded = study.user_attrs["latency_table"]
    assert complete and all(t.user_attrs["size"]["latency_table"] == recorded for t in complete)

    (table,) = (tmp_path / "cache" / "latency").glob("*.json")  # measured again: other timings
    data = json.loads(table.read_text())
    data["probes"][0]["timing"]["prefill_ms"] *= 2
    table.write_text(json.dumps(data))

    more = SearchConfig(**{**config.model_dump(), "trials": 6})
    with pytest.raises(AutopruneError, match="priced its latencies") as error:
        run_search(more, progress=False)
    assert "\n" not in str(error.value)
    after = load_existing_study(config.storage, config.study)
    assert len(after.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == len(complete)
    assert after.user_attrs["latency_table"] == recorded
    refine = RefineConfig(storage=config.storage, study=config.study, trial=complete[0].number, generations=1,
                          offspring=2, pool_windows=4, screen_tokens=8, cache_dir=config.cache_dir)
    with pytest.raises(AutopruneError, match="priced its latencies"):
        refine_trial(refine, progress=False)
