"""The predictor's width features (sub-network plans) on the tiny LLaMA: plans without a structure
featurize as before, widths and cuts read as they should, predictors saved before the width
features still load, and on synthetic data the width features rank held-out sub-networks that size
alone cannot."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from conftest import REFINE_STUDY
from optuna.trial import TrialState
from scipy.stats import spearmanr

from autoprune import CalibrationConfig, prepare
from autoprune.errors import AutopruneError
from autoprune.plan import LayerSpec, NMPattern, Plan
from autoprune.structure import BlockWidths, Structure, decoder_linear_params, model_dims, resolve_blocks
from predictors import Featurizer, Predictor, TrainingSet, study_featurizer, training_set
from predictors.features import space_has_widths
from predictors.model import meta_path_of
from search_spaces import SearchSpace, SpaceContext


@pytest.fixture(scope="module")
def featurizers(tiny_llama_dir, data_dir, tmp_path_factory):
    """The plain and the width featurizer of the tiny LLaMA (4 blocks, 2 KV groups of 2 heads,
    FFN 128), and its dense shape."""
    calibration = CalibrationConfig(source=str(data_dir), n_samples=8, seq_len=32)
    loaded, stats, _ = prepare(str(tiny_llama_dir), calibration, tmp_path_factory.mktemp("cache"), False)
    ctx = SpaceContext.from_model(loaded, stats, "wanda", (0.3, 0.7), outlier_thresholds=())
    plain = Featurizer.from_model(loaded, stats, ctx)
    return plain, Featurizer.from_model(loaded, stats, ctx, widths=True), model_dims(loaded.model)


def value(featurizer: Featurizer, row: np.ndarray, name: str) -> float:
    return float(row[featurizer.names.index(name)])


def sub(blocks: dict[int, BlockWidths], removed: list[int] | None = None, **layers: LayerSpec) -> Plan:
    return Plan(structure=Structure(blocks=blocks), removed_blocks=removed or [], layers=layers)


def test_plans_without_structure_featurize_as_before(featurizers):
    plain, widths, _ = featurizers
    assert widths.names[: len(plain.names)] == plain.names and not plain.schema.widths
    q_proj = next(iter(plain.ctx.layers))
    plans = [Plan(), Plan(removed_blocks=[1, 3]), Plan(layers={q_proj: LayerSpec(sparsity=0.4)}),
             Plan(layers={name: LayerSpec(nm=NMPattern(n=2, m=4)) for name in plain.ctx.layers})]
    before, after = plain.transform(plans), widths.transform(plans)
    assert np.array_equal(after[:, : len(plain.names)], before)  # bit for bit
    removed = after[1]
    assert value(widths, removed, "block1.heads_kept") == 0.0 and value(widths, removed, "block0.heads_kept") == 1.0
    assert value(widths, removed, "block1.ffn_mass_removed") == 1.0
    assert value(widths, after[0], "model.ffn_mass_removed") == 0.0


def test_width_features_describe_cuts(featurizers):
    _, featurizer, dims = featurizers
    narrow, wide, heads, dropped = featurizer.transform([
        sub({0: BlockWidths(ffn=32)}), sub({0: BlockWidths(ffn=96)}),
        sub({2: BlockWidths(kv_groups=1, heads_per_group=1)}), sub({3: BlockWidths(drop_attention=True)}, [1]),
    ])
    assert value(featurizer, narrow, "block0.ffn_kept") == 0.25 and value(featurizer, wide, "block0.ffn_kept") == 0.75
    cut = [value(featurizer, row, "block0.ffn_mass_removed") for row in (narrow, wide)]
    assert 0 < cut[1] < 0.25 and cut[1] < cut[0] < 0.75  # the cut keeps the most important channels
    assert value(featurizer, narrow, "block0.mlp.up_proj.sparsity") == 0.75
    assert value(featurizer, narrow, "block0.mlp.down_proj.mass_removed") == pytest.approx(cut[0])
    assert value(featurizer, narrow, "block0.self_attn.q_proj.sparsity") == 0.0
    assert value(featurizer, narrow, "block1.ffn_mass_removed") == 0.0
    assert value(featurizer, heads, "block2.heads_kept") == 0.25 and value(featurizer, heads, "block2.kv_groups_kept") == 0.5
    assert value(featurizer, heads, "block2.self_attn.k_proj.sparsity") == 0.5
    assert value(featurizer, heads, "block2.self_attn.o_proj.sparsity") == 0.75
    assert 0 < value(featurizer, heads, "block2.heads_mass_removed") < 0.75
    assert value(featurizer, dropped, "block3.drop_attention") == 1.0 and value(featurizer, dropped, "model.dropped_attention") == 1.0
    assert value(featurizer, dropped, "block3.self_attn.v_proj.sparsity") == 1.0
    assert value(featurizer, dropped, "block3.mlp.gate_proj.sparsity") == 0.0
    assert value(featurizer, dropped, "block1.removed") == 1.0
    influence = np.array(featurizer.ctx.block_influence)
    assert value(featurizer, dropped, "model.heads_missing_influence") == pytest.approx(
        (influence[1] + influence[3]) / influence.sum()
    )
    for row, plan in zip((narrow, heads, dropped), (sub({0: BlockWidths(ffn=32)}),
                         sub({2: BlockWidths(kv_groups=1, heads_per_group=1)}),
                         sub({3: BlockWidths(drop_attention=True)}, [1]))):
        params = decoder_linear_params(resolve_blocks(plan.structure, plan.removed_blocks, dims), dims)
        dense = decoder_linear_params(resolve_blocks(None, [], dims), dims)
        assert value(featurizer, row, "model.kept_fraction") == pytest.approx(params / dense)
    # unstructured sparsity on top of a cut counts on the kept weights
    up = "model.layers.0.mlp.up_proj"
    both, = featurizer.transform([sub({0: BlockWidths(ffn=64)}, **{up: LayerSpec(sparsity=0.5)})])
    assert value(featurizer, both, "block0.mlp.up_proj.sparsity") == 0.75


def test_sub_networks_are_refused_where_widths_are_not_described(featurizers, tmp_path):
    plain, featurizer, _ = featurizers
    with pytest.raises(AutopruneError, match="sub-network .* describe no widths"):
        plain.transform([sub({0: BlockWidths(ffn=32)})])
    with pytest.raises(AutopruneError, match="block 0: keeps 300 FFN channels but the model has 128"):
        featurizer.transform([sub({0: BlockWidths(ffn=300)})])
    plans = [Plan(layers={name: LayerSpec(sparsity=s) for name in plain.ctx.layers}) for s in (0.2, 0.4, 0.6, 0.7)]
    data = training_set_of(plain, plans, np.array([10.0, 12.0, 20.0, 35.0]))
    predictor = Predictor.fit(data, plain.schema)
    with pytest.raises(AutopruneError, match="width features False there, True here"):
        predictor.predict(plans, featurizer)
    # a predictor saved before the width features existed (no "widths" in its metadata) still loads
    path = tmp_path / "old.predictor.json"
    predictor.save(path)
    meta = json.loads(meta_path_of(path).read_text())
    del meta["features"]["widths"]
    meta_path_of(path).write_text(json.dumps(meta))
    old = Predictor.load(path)
    assert not old.meta.features.widths
    assert np.array_equal(old.predict(plans, plain), predictor.predict(plans, plain))


class _WidthSpace(SearchSpace):
    """A one-parameter space of uniform FFN widths (no ``name``: not registered)."""

    def distributions(self, ctx):
        from optuna.distributions import IntDistribution
        return {"ffn": IntDistribution(16, 128, step=16)}

    def cast(self, params, ctx):
        return Plan(structure=Structure(every_block=BlockWidths(ffn=params["ffn"])))

    def baselines(self, ctx, targets):
        return {}


def test_spaces_of_sub_networks_get_width_features(featurizers):
    plain, _, _ = featurizers
    assert space_has_widths(_WidthSpace(), plain.ctx)
    assert not space_has_widths(SearchSpace.named("layerwise"), plain.ctx)


def test_width_features_rank_held_out_sub_networks_on_synthetic_quality(featurizers):
    """Quality made of per-block sensitivities the features do not contain (block 0's FFN matters
    most, block 3's heads little): the predictor must learn *where* a cut is, not only how large."""
    _, featurizer, dims = featurizers
    rng = np.random.default_rng(0)
    ffn_weight, head_weight = np.array([5.0, 0.5, 2.0, 0.2]), np.array([0.5, 4.0, 0.2, 0.1])
    plans, quality = [], []
    for _ in range(90):
        ffn = rng.integers(1, 9, size=dims.num_blocks) * 16
        groups = rng.integers(1, 3, size=dims.num_blocks)
        per_group = rng.integers(1, 3, size=dims.num_blocks)
        blocks = {b: BlockWidths(kv_groups=int(groups[b]), heads_per_group=int(per_group[b]), ffn=int(ffn[b]))
                  for b in range(dims.num_blocks)}
        plans.append(sub(blocks))
        lost_ffn, lost_heads = 1 - ffn / dims.ffn, 1 - groups * per_group / dims.num_heads
        quality.append(np.exp(2.0 + ffn_weight @ lost_ffn + head_weight @ lost_heads))
    data = training_set_of(featurizer, plans, np.array(quality))
    train, test = np.arange(60), np.arange(60, 90)
    predictor = Predictor.fit(data.subset(train), featurizer.schema)
    held = data.subset(test)
    rho = spearmanr(predictor.scores(held.features), held.quality).statistic
    kept = held.features[:, featurizer.names.index("model.kept_fraction")]
    size_only = spearmanr(-kept, held.quality).statistic
    assert rho >= 0.9 and rho > size_only + 0.1


def training_set_of(featurizer: Featurizer, plans: list[Plan], quality: np.ndarray) -> TrainingSet:
    features = featurizer.transform(plans)
    kept = features[:, featurizer.names.index("model.kept_fraction")]
    return TrainingSet("synthetic", "ppl", np.arange(len(plans)), plans, kept, quality, features,
                       np.ones(len(plans), dtype=bool))


def test_a_study_holding_sub_networks_gets_width_features(studied):
    """A layer-wise study's featurizer has no width columns until the study holds a sub-network
    trial; then it has them and its training set reads that trial's kept fraction."""
    study = optuna.load_study(study_name=REFINE_STUDY, storage=studied.config.storage)
    cache = studied.folder / "cache"
    assert not study_featurizer(study, cache).schema.widths
    template = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    plan = Plan(method="sparsegpt", structure=Structure(every_block=BlockWidths(ffn=64)))
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE, params=template.params, distributions=template.distributions,
        values=template.values, user_attrs={**template.user_attrs, "plan": plan.model_dump(mode="json")},
    ))
    featurizer = study_featurizer(study, cache)
    assert featurizer.schema.widths
    data = training_set(study, featurizer)
    row = data.features[list(data.trials).index(len(study.trials) - 1)]
    attention, mlp = 2 * 64 * 64 + 2 * 32 * 64, 3 * 64 * 128  # q, o; k, v; gate, up, down
    assert value(featurizer, row, "model.kept_fraction") == pytest.approx((attention + mlp / 2) / (attention + mlp))
