"""The versioned description of a feature vector, stored with every trained predictor.

A predictor is only meaningful for the model (and calibration) whose layers and importance tables
made its features. The schema names them: features version, model fingerprint (a content hash),
calibration key, number of blocks, the layer names and a hash of their kinds and shapes. Predicting
with a featurizer whose schema differs is refused with the first difference named, and so is a plan
naming layers or blocks the model does not have: never a silent guess.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict

from autoprune.errors import AutopruneError
from autoprune.plan import Plan
from search_spaces import LayerInfo

#: Bumped whenever the features or their order change; older predictors are then refused.
FEATURE_SCHEMA_VERSION = 1


class FeatureSchema(BaseModel):
    """What a feature vector means: which model, which calibration, which columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = FEATURE_SCHEMA_VERSION
    model_fingerprint: str
    calibration: str
    num_blocks: int
    layers: tuple[str, ...]
    layers_hash: str
    names: tuple[str, ...]
    #: Whether the sub-network (width) features are among ``names``; predictors saved before
    #: they existed have none, and read as such.
    widths: bool = False

    def check_plan(self, plan: Plan) -> None:
        """Refuse a plan of another model: layers this one lacks, blocks beyond its last."""
        model = f"model {self.model_fingerprint} ({self.num_blocks} blocks)"
        unknown = sorted(set(plan.layers) - set(self.layers))
        if unknown:
            raise AutopruneError(f"plan names layer {unknown[0]!r}, which {model} does not have")
        if plan.removed_blocks and max(plan.removed_blocks) >= self.num_blocks:
            raise AutopruneError(f"plan removes block {max(plan.removed_blocks)}, beyond {model}")
        if plan.structure is not None and not self.widths:
            raise AutopruneError(
                "plan is a sub-network (it has a structure) but these features describe no widths; "
                "use a predictor fitted on a study of sub-network plans"
            )

    def require_same(self, other: FeatureSchema) -> None:
        """Raise naming the first way ``other`` (the featurizer at hand) differs from this schema
        (the one a predictor was trained with)."""
        checks = (
            ("features version", self.version, other.version),
            ("number of decoder blocks", self.num_blocks, other.num_blocks),
            ("layer names and shapes (hash)", self.layers_hash, other.layers_hash),
            ("model fingerprint", self.model_fingerprint, other.model_fingerprint),
            ("calibration statistics", self.calibration, other.calibration),
            ("width features", self.widths, other.widths),
            ("feature columns", self.names, other.names),
        )
        for what, trained, given in checks:
            if trained != given:
                shown = (trained, given) if what != "feature columns" else ("...", "...")
                raise AutopruneError(
                    f"the predictor was trained on other features: {what} {shown[0]!r} there, "
                    f"{shown[1]!r} here; fit a predictor for this model (autoprune predictor fit)"
                )


def layers_hash(layers: dict[str, LayerInfo]) -> str:
    """A short hash of the decoder linear layers' names, kinds and shapes, in order."""
    described = [[name, info.block, info.kind, info.rows, info.cols] for name, info in layers.items()]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
