"""Method names have one source, the registry of :class:`PruningMethod` subclasses: plans and
settings validate against it, and a bad name is an error that lists the known ones."""

from __future__ import annotations

import gc
import re

import pytest
import torch
from pydantic import ValidationError

from autoprune.errors import AutopruneError
from autoprune.methods import LayerJob, PruningMethod
from autoprune.plan import Plan
from autoprune.study import SearchConfig

KNOWN = "(known: admm, magnitude, sparsegpt, wanda)"


def test_an_unknown_method_is_refused_naming_the_known_ones():
    with pytest.raises(ValidationError, match=re.escape(f"unknown pruning method 'obs' {KNOWN}")):
        Plan(method="obs")
    with pytest.raises(AutopruneError) as caught:
        SearchConfig.load(None, {"method": "obs"})
    assert str(caught.value) == f"--method: invalid method: unknown pruning method 'obs' {KNOWN}"
    assert Plan(method="admm").method == "admm"
    assert Plan.from_json(Plan(method="sparsegpt").to_json()).method == "sparsegpt"


def test_a_new_method_class_is_a_valid_name_at_once_and_only_while_it_exists():
    class Keep(PruningMethod):
        name = "keep-everything"

        def prune(self, jobs: list[LayerJob]) -> dict[str, torch.Tensor]:
            return {job.name: job.weight for job in jobs}

    assert Plan(method="keep-everything").method == "keep-everything"
    assert isinstance(PruningMethod.named("keep-everything"), Keep)
    del Keep
    gc.collect()  # the registry holds no class alive: the name goes with its class
    assert "keep-everything" not in PruningMethod.available()
    with pytest.raises(ValidationError, match="unknown pruning method 'keep-everything'"):
        Plan(method="keep-everything")
