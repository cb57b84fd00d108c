"""`autoprune prune --structured` and sub-network recipes on the tiny LLaMA: a smaller checkpoint
that transformers loads, its reported perplexity reproduced, bad plans refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.cli import main
from autoprune.data import evaluation_windows
from autoprune.measure import perplexity


def _prune(capsys, model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    code = main([
        "prune", "--model", str(model), "--data", str(data), "--calib-samples", "8", "--seq-len", "32",
        "--eval-windows", "4", "--out", str(out), "--format", "json", *extra,
    ])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_structured_prune_writes_a_smaller_stock_llama(capsys, tiny_llama_dir, data_dir, tmp_path) -> None:
    out = tmp_path / "cut"
    code, stdout, _ = _prune(capsys, tiny_llama_dir, data_dir, out, "--structured", "heads=2,ffn=64")
    assert code == 0
    report = json.loads(stdout)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    config = reloaded.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 2, 64)
    # 4 blocks x (q 64x32 + k,v 64x32 each + o 32x64 + 3 x 64x64)
    assert report["linear_params"] == 4 * (4 * 64 * 32 + 3 * 64 * 64)
    windows = evaluation_windows(str(data_dir), AutoTokenizer.from_pretrained(out), 32, 4)
    assert perplexity(reloaded, windows) == pytest.approx(report["ppl"], rel=1e-4)


def test_per_block_recipe_writes_a_remote_code_checkpoint(capsys, tiny_llama_dir, data_dir, tmp_path) -> None:
    recipe = {
        "model": str(tiny_llama_dir),
        "calibration": {"source": str(data_dir), "n_samples": 8, "seq_len": 32, "seed": 0},
        "plan": {"schema_version": 2, "removed_blocks": [3], "structure": {
            "method": "obs", "blocks": {"0": {"ffn": 40}, "1": {"drop_attention": True}, "2": {"kv_groups": 1}}}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cut"
    code = main(["prune", "--recipe", str(path), "--data", str(data_dir), "--seq-len", "32",
                 "--eval-windows", "4", "--out", str(out), "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert reloaded.config.num_hidden_layers == 3
    windows = evaluation_windows(str(data_dir), AutoTokenizer.from_pretrained(out), 32, 4)
    assert perplexity(reloaded, windows) == pytest.approx(report["ppl"], rel=1e-4)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("heads=3", "grouped-query attention"),
        ("ffn=0", "keeps 0 channels"),
        ("ffn=999", "keeps 999 FFN channels"),
        ("width=3", "expected heads=N"),
    ],
)
def test_bad_structured_plans_fail_in_one_line_and_write_nothing(
    capsys, tiny_llama_dir, data_dir, tmp_path, spec: str, message: str
) -> None:
    out = tmp_path / "cut"
    code, _, stderr = _prune(capsys, tiny_llama_dir, data_dir, out, "--structured", spec)
    assert code == 2 and message in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("autoprune: error:")]
    assert len(errors) == 1 and stderr.rstrip("\n").endswith(errors[0]) and "Traceback" not in stderr
    assert not out.exists()


def test_structured_with_sparsity_is_refused(capsys, tiny_llama_dir, data_dir, tmp_path) -> None:
    code, _, stderr = _prune(capsys, tiny_llama_dir, data_dir, tmp_path / "x", "--structured", "ffn=64",
                             "--sparsity", "0.5")
    assert code == 2 and "cannot be combined" in stderr


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"schema_version": 1, "structure": {"every_block": {"ffn": 64}}}, "needs schema_version 2"),
        ({"structure": {"blocks": {"0": {"drop_mlp": True}}},
          "layers": {"model.layers.0.mlp.up_proj": {"sparsity": 0.5}}}, "which its sub-network does not keep"),
        ({"structure": {"every_block": {"ffn": 66}},
          "layers": {"model.layers.1.mlp.down_proj": {"nm": {"n": 2, "m": 4}}}}, "keeps 66 inputs"),
        ({"structure": {"blocks": {"7": {"ffn": 64}}}}, "block 7 does not exist"),
        ({"structure": {}, "removed_blocks": [0, 1, 2, 3]}, "removes every block"),
    ],
)
def test_bad_sub_network_recipes_fail_in_one_line(capsys, tiny_llama_dir, data_dir, tmp_path, plan, message) -> None:
    recipe = {"model": str(tiny_llama_dir),
              "calibration": {"source": str(data_dir), "n_samples": 8, "seq_len": 32, "seed": 0}, "plan": plan}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cut"
    code = main(["prune", "--recipe", str(path), "--out", str(out), "--format", "json"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("autoprune: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not out.exists()
