"""Sub-networks: plan schema v2, structured methods (conformance), slicing, export that reloads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from autoprune.calibration import calibrate
from autoprune.errors import AutopruneError
from autoprune.models import load_model
from autoprune.plan import Plan
from autoprune.structure import (
    BlockWidths,
    ModelDims,
    Structure,
    UnitLayout,
    activation_scores,
    build_subnet,
    choose_cuts,
    decoder_linear_params,
    heads_to_groups,
    least_squares_correction,
    model_dims,
    obs_select,
    resolve_blocks,
    save_subnet,
    select_by_scores,
)

SMOLLM_DIMS = ModelDims(num_blocks=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden=576, ffn=1536)
METHODS = ("activation", "weighted", "obs")


# --- plan schema v2 -------------------------------------------------------------------------


def test_v1_plan_reads_and_v2_round_trips() -> None:
    old = Plan.from_json(json.dumps({"schema_version": 1, "method": "wanda", "removed_blocks": [2]}))
    assert old.structure is None and old.removed_blocks == [2]
    plan = Plan(structure=Structure(every_block=BlockWidths(ffn=96), blocks={1: BlockWidths(drop_mlp=True)}))
    assert plan.schema_version == 3  # the current version (3 added quantization)
    assert Plan.from_json(plan.to_json()) == plan
    v2 = Plan.from_json(plan.model_copy(update={"schema_version": 2}).model_dump_json(exclude={"quantization"}))
    assert v2.schema_version == 2 and v2.structure == plan.structure


def test_v1_plan_cannot_carry_a_structure() -> None:
    with pytest.raises(ValidationError, match="schema_version 2"):
        Plan(schema_version=1, structure=Structure())


@pytest.mark.parametrize(
    "widths",
    [{"ffn": 0}, {"kv_groups": 0}, {"heads_per_group": 0}, {"drop_attention": True, "drop_mlp": True}],
)
def test_empty_kept_sub_block_is_rejected(widths: dict) -> None:
    with pytest.raises(ValidationError):
        BlockWidths(**widths)


def test_width_zero_is_fine_where_the_sub_block_is_dropped() -> None:
    assert BlockWidths(ffn=0, drop_mlp=True).drop_mlp
    assert BlockWidths(kv_groups=0, drop_attention=True).drop_attention


@pytest.mark.parametrize(
    ("structure", "removed", "message"),
    [
        (Structure(every_block=BlockWidths(kv_groups=4)), [], "keeps 4 KV groups but the model has 3"),
        (Structure(every_block=BlockWidths(heads_per_group=4)), [], "a group has 3"),
        (Structure(blocks={5: BlockWidths(ffn=2000)}), [], "block 5: keeps 2000 FFN channels"),
        (Structure(blocks={30: BlockWidths(ffn=10)}), [], "block 30 does not exist"),
        (Structure(), list(range(30)), "removes every block"),
        (Structure(), [31], "block 31 does not exist"),
    ],
)
def test_resolve_rejects_what_does_not_fit(structure: Structure, removed: list[int], message: str) -> None:
    with pytest.raises(AutopruneError, match=message) as caught:
        resolve_blocks(structure, removed, SMOLLM_DIMS)
    assert "\n" not in str(caught.value)


def test_resolve_fills_dense_counts_and_zero_for_dropped() -> None:
    structure = Structure(every_block=BlockWidths(ffn=1152), blocks={3: BlockWidths(drop_attention=True)})
    shapes = resolve_blocks(structure, [7], SMOLLM_DIMS)
    assert shapes[7] is None
    assert (shapes[0].kv_groups, shapes[0].heads_per_group, shapes[0].ffn) == (3, 3, 1152)
    assert (shapes[3].heads, shapes[3].ffn) == (0, 1536)


@pytest.mark.parametrize(("heads", "expected"), [(9, (3, 3)), (6, (3, 2)), (4, (2, 2)), (3, (3, 1)), (1, (1, 1))])
def test_heads_to_groups_keeps_gqa(heads: int, expected: tuple[int, int]) -> None:
    assert heads_to_groups(heads, SMOLLM_DIMS) == expected


@pytest.mark.parametrize("heads", [5, 7, 8, 10])
def test_heads_to_groups_rejects_counts_that_break_gqa(heads: int) -> None:
    with pytest.raises(AutopruneError, match="grouped-query attention"):
        heads_to_groups(heads, SMOLLM_DIMS)


# --- pure selection and correction functions ------------------------------------------------


def test_select_by_scores_keeps_whole_groups_and_equal_counts() -> None:
    layout = UnitLayout(unit_size=1, n_groups=3, units_per_group=3)
    scores = torch.tensor([9.0, 1, 1, 5, 5, 5, 0, 0, 8])
    # group totals 11, 15, 8: keep groups 0 and 1, two best units in each
    assert select_by_scores(scores, layout, 2, 2) == [0, 1, 3, 4]


def test_activation_scores_sum_a_units_channels() -> None:
    layout = UnitLayout(unit_size=2, n_groups=1, units_per_group=2)
    scores = activation_scores(torch.tensor([9.0, 16.0, 1.0, 0.0]), layout)
    assert torch.allclose(scores, torch.tensor([5.0, 1.0], dtype=torch.float64))


def _regression(seed: int = 0, n: int = 400, width: int = 12, out: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen, dtype=torch.float64)
    w = torch.randn(out, width, generator=gen, dtype=torch.float64)
    return x, w


def test_least_squares_correction_beats_plain_slicing() -> None:
    x, w = _regression()
    x[:, 5] = x[:, 4] + 0.01 * x[:, 5]  # a dropped column that a kept one explains
    kept = [c for c in range(12) if c != 5]
    corrected = least_squares_correction(w, x.T @ x, kept, damping=0.0)
    target = x @ w.T
    exact = torch.linalg.lstsq(x[:, kept], target).solution.T
    assert torch.allclose(corrected, exact, atol=1e-8)
    plain = (target - x[:, kept] @ w[:, kept].T).norm()
    fixed = (target - x[:, kept] @ corrected.T).norm()
    assert fixed < 0.1 * plain
    assert torch.allclose(least_squares_correction(w, x.T @ x, list(range(12)), damping=0.01), w)


def test_obs_removes_the_column_others_explain() -> None:
    x, w = _regression(seed=1)
    x[:, 7] = x[:, 2] * 2.0 + 1e-4 * x[:, 7]  # column 7 is (almost) column 2 scaled
    w[:, 7] *= 10.0  # and carries large weights, so magnitude-style scores would keep it
    kept = obs_select(w, x.T @ x, UnitLayout(1, 1, 12), 1, 11)
    assert len(kept) == 11 and (2 not in kept or 7 not in kept)


def test_obs_keeps_equal_heads_per_kept_group() -> None:
    x, w = _regression(seed=2, width=24)
    layout = UnitLayout(unit_size=2, n_groups=3, units_per_group=4)
    kept = obs_select(w, x.T @ x, layout, 2, 3)
    groups = [unit // 4 for unit in kept]
    assert len(kept) == 6 and len(set(groups)) == 2
    assert all(groups.count(group) == 3 for group in set(groups))


# --- conformance on a tiny model -------------------------------------------------------------


@pytest.fixture
def tiny(tiny_llama_dir: Path):
    """The tiny LLaMA (4 blocks, 4 query heads in 2 KV groups of head_dim 16, FFN 128) and its
    statistics on random tokens (each test its own cache)."""
    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(3, loaded.model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(loaded, windows, progress=False).stats
    return loaded, stats, windows


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize(("method", "correct"), list(itertools.product(METHODS, (False, True))))
def test_structured_method_conformance(tiny, method: str, correct: bool) -> None:
    loaded, stats, windows = tiny
    structure = Structure(method=method, correct=correct, every_block=BlockWidths(kv_groups=1, heads_per_group=1, ffn=40))
    cuts = choose_cuts(loaded.model, stats, structure, [])
    for cut in cuts:
        assert len(cut.heads) == 1 and len(cut.channels) == 40
    first = build_subnet(loaded.model, stats, structure)
    again = build_subnet(loaded.model, stats, structure)
    for block in first.model.layers:
        assert block.self_attn.q_proj.weight.shape == (16, 64)
        assert block.self_attn.k_proj.weight.shape == (16, 64)
        assert block.self_attn.o_proj.weight.shape == (64, 16)
        assert block.mlp.gate_proj.weight.shape == (40, 64)
        assert block.mlp.down_proj.weight.shape == (64, 40)
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    logits = _logits(first, windows[:1])
    assert logits.shape == _logits(loaded.model, windows[:1]).shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_gqa_kept_heads_fill_kept_groups_equally(tiny, method: str) -> None:
    loaded, stats, _ = tiny
    structure = Structure(method=method, every_block=BlockWidths(kv_groups=2, heads_per_group=1))
    for cut in choose_cuts(loaded.model, stats, structure, []):
        assert sorted(head // 2 for head in cut.heads) == [0, 1]


def test_cutting_nothing_reproduces_the_dense_model(tiny) -> None:
    loaded, stats, windows = tiny
    subnet = build_subnet(loaded.model, stats, Structure())
    assert isinstance(subnet, LlamaForCausalLM)
    assert torch.allclose(_logits(subnet, windows[:2]), _logits(loaded.model, windows[:2]), atol=1e-5)


def test_uncorrected_cut_equals_zeroing_what_goes(tiny) -> None:
    """Slicing without correction computes what the dense model computes with the removed heads'
    and channels' consuming columns zeroed, and dropped sub-blocks' outputs zeroed."""
    loaded, stats, windows = tiny
    structure = Structure(
        method="activation", correct=False, every_block=BlockWidths(kv_groups=1, heads_per_group=1, ffn=50),
        blocks={2: BlockWidths(drop_attention=True, ffn=70), 3: BlockWidths(drop_mlp=True)},
    )
    cuts = choose_cuts(loaded.model, stats, structure, [1])
    subnet = build_subnet(loaded.model, stats, structure, [1])
    dense = loaded.model
    reference = load_model(str(Path(loaded.spec))).model
    with torch.no_grad():
        for cut in cuts:
            block = reference.model.layers[cut.index]
            gone_heads = [h for h in range(4) if h not in cut.heads]
            for head in gone_heads:
                block.self_attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
            gone = [c for c in range(128) if c not in cut.channels]
            block.mlp.down_proj.weight[:, gone] = 0
        with loaded.adapter.without_blocks(reference, [1]):
            expected = _logits(reference, windows[:2])
    assert dense is not reference
    assert torch.allclose(_logits(subnet, windows[:2]), expected, atol=1e-5)


def test_correction_lowers_the_loss_of_a_cut(tiny) -> None:
    loaded, stats, windows = tiny
    widths = BlockWidths(ffn=32)
    losses = {}
    for correct in (False, True):
        subnet = build_subnet(loaded.model, stats, Structure(method="activation", correct=correct, every_block=widths))
        with torch.no_grad():
            losses[correct] = subnet(windows, labels=windows, use_cache=False).loss.item()
    assert losses[True] < losses[False]


def test_opt_is_refused_with_one_line(tiny_opt_dir: Path) -> None:
    loaded = load_model(str(tiny_opt_dir))
    with pytest.raises(AutopruneError, match="LLaMA-family"):
        build_subnet(loaded.model, None, Structure())


# --- export that reloads -----------------------------------------------------------------------


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_uniform_cut_saves_a_stock_llama(tiny, tmp_path: Path) -> None:
    loaded, stats, windows = tiny
    structure = Structure(every_block=BlockWidths(kv_groups=1, heads_per_group=2, ffn=64))
    subnet = build_subnet(loaded.model, stats, structure, [0])
    save_subnet(subnet, loaded.tokenizer, tmp_path / "out", {"note": "test"}, loaded.source_dtype)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and "per_layer_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 64)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is LlamaForCausalLM
    assert torch.allclose(_logits(reloaded, windows[:2]), _logits(subnet, windows[:2]), atol=1e-6)


def test_per_block_cut_reloads_with_remote_code(tiny, tmp_path: Path) -> None:
    loaded, stats, windows = tiny
    structure = Structure(
        blocks={0: BlockWidths(kv_groups=1, ffn=24), 2: BlockWidths(drop_attention=True), 3: BlockWidths(drop_mlp=True, heads_per_group=1)}
    )
    subnet = build_subnet(loaded.model, stats, structure, [1])
    save_subnet(subnet, loaded.tokenizer, tmp_path / "out", {}, loaded.source_dtype)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 3
    assert config["per_layer_config"]["1"] == {"skip": ["self_attn"]}
    assert (tmp_path / "out" / "modeling_subnet_llama.py").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.allclose(_logits(reloaded, windows[:2]), _logits(subnet, windows[:2]), atol=1e-6)
    generated = reloaded.generate(windows[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_parameter_count_and_folder_size_follow_the_shapes(tiny, tmp_path: Path) -> None:
    loaded, stats, _ = tiny
    dims = model_dims(loaded.model)
    dense_linear = decoder_linear_params(resolve_blocks(None, [], dims), dims)
    structure = Structure(blocks={0: BlockWidths(kv_groups=1, ffn=24), 2: BlockWidths(drop_attention=True)})
    subnet = build_subnet(loaded.model, stats, structure, [3])
    linear = sum(
        m.weight.numel() for n, m in subnet.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")
    )
    expected = decoder_linear_params(resolve_blocks(structure, [3], dims), dims)
    assert linear == expected < dense_linear
    assert loaded.source_dtype == torch.float32  # the tiny model is saved in float32
    save_subnet(subnet, loaded.tokenizer, tmp_path / "small", {}, loaded.source_dtype)
    save_subnet(build_subnet(loaded.model, stats, Structure()), loaded.tokenizer, tmp_path / "dense", {},
                loaded.source_dtype)
    saved_small, saved_dense = _folder_bytes(tmp_path / "small"), _folder_bytes(tmp_path / "dense")
    removed_bytes = 4 * (dense_linear - linear)  # float32; beside them only norms and headers
    assert abs((saved_dense - saved_small) - removed_bytes) <= 4096
