"""GGUF export: tiny random LLaMA models written as GGUF and read back by transformers' GGUF loader
(weights, logits, perplexity, tokenizer), removed blocks, per-block widths, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import optuna
import pytest
import torch
import yaml
from conftest import TRIALS_ONLY, save_tiny_model, synthetic_text, tiny_config, tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.cli import main
from autoprune.data import evaluation_windows
from autoprune.errors import AutopruneError
from autoprune.export import save_checkpoint
from autoprune.export_gguf import export_checkpoint_gguf, write_gguf
from autoprune.measure import perplexity
from autoprune.models import LlamaFamilyAdapter, load_model
from autoprune.study import run_search

TEXT = "the city was first known in the world after the new school , 2024 ."


@pytest.fixture(scope="module")
def bpe_llama_dir(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> Path:
    return save_tiny_model(
        tiny_llama_config(len(bpe_tokenizer)), bpe_tokenizer, tmp_path_factory.mktemp("bpe-llama")
    )


def windows_for(tokenizer, seq_len: int = 32, count: int = 4) -> torch.Tensor:
    ids = tokenizer(synthetic_text(7, 60))["input_ids"][: seq_len * count]
    return torch.tensor(ids).reshape(count, seq_len)


def reload(path: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


def test_f16_export_reloads_with_the_same_logits_perplexity_and_tokenizer(bpe_llama_dir, tmp_path):
    loaded = load_model(str(bpe_llama_dir))
    path = tmp_path / "model-f16.gguf"
    layout = export_checkpoint_gguf(bpe_llama_dir, path, "f16")
    assert layout.architecture == "llama" and layout.uniform
    model = reload(path)
    windows = windows_for(loaded.tokenizer)
    with torch.no_grad():
        want, got = loaded.model(windows).logits, model(windows).logits
    assert torch.allclose(want, got, atol=5e-3), (want - got).abs().max()
    ppl, ppl_gguf = perplexity(loaded.model, windows), perplexity(model, windows)
    assert abs(ppl_gguf / ppl - 1) < 0.01
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tokenizer(TEXT)["input_ids"] == loaded.tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_q8_0_is_smaller_and_close(bpe_llama_dir, tmp_path):
    loaded = load_model(str(bpe_llama_dir))
    f16, q8 = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(loaded.model, loaded.tokenizer, f16, "f16")
    write_gguf(loaded.model, loaded.tokenizer, q8, "q8_0")
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    windows = windows_for(loaded.tokenizer)
    assert abs(perplexity(reload(q8), windows) / perplexity(loaded.model, windows) - 1) < 0.02


def test_removed_blocks_export_as_fewer_blocks(bpe_llama_dir, tmp_path):
    loaded = load_model(str(bpe_llama_dir))
    loaded.adapter.remove_blocks(loaded.model, [1, 2])
    path = tmp_path / "cut.gguf"
    write_gguf(loaded.model, loaded.tokenizer, path)
    model = reload(path)
    assert model.config.num_hidden_layers == 2
    windows = windows_for(loaded.tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded.model(windows).logits, model(windows).logits, atol=5e-3)


def test_blocks_of_different_widths_become_deci_with_per_layer_arrays(bpe_llama_dir, tmp_path):
    loaded = load_model(str(bpe_llama_dir))
    block = LlamaFamilyAdapter().blocks(loaded.model)[0]
    head_dim = 16
    attention, mlp = block.self_attn, block.mlp
    attention.q_proj.weight.data = attention.q_proj.weight.data[: 2 * head_dim]  # 4 -> 2 heads
    attention.o_proj.weight.data = attention.o_proj.weight.data[:, : 2 * head_dim]
    attention.k_proj.weight.data = attention.k_proj.weight.data[:head_dim]  # 2 -> 1 KV head
    attention.v_proj.weight.data = attention.v_proj.weight.data[:head_dim]
    mlp.gate_proj.weight.data = mlp.gate_proj.weight.data[:96]
    mlp.up_proj.weight.data = mlp.up_proj.weight.data[:96]
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, :96]
    path = tmp_path / "subnet.gguf"
    layout = write_gguf(loaded.model, loaded.tokenizer, path)
    assert layout.architecture == "deci" and not layout.uniform
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "deci"
    assert fields["deci.attention.head_count"].contents() == [2, 4, 4, 4]
    assert fields["deci.attention.head_count_kv"].contents() == [1, 2, 2, 2]
    assert fields["deci.feed_forward_length"].contents() == [96, 128, 128, 128]
    assert fields["deci.attention.key_length"].contents() == head_dim


def test_bad_type_and_foreign_architecture_write_nothing(bpe_llama_dir, tiny_opt_dir, tmp_path):
    with pytest.raises(AutopruneError, match="unknown GGUF type 'q4_k'"):
        export_checkpoint_gguf(bpe_llama_dir, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(AutopruneError, match="not model type 'opt'"):
        export_checkpoint_gguf(tiny_opt_dir, tmp_path / "y.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_llama_cpp_cannot_name_is_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(AutopruneError, match="GGUF export supports byte-level BPE tokenizers; this one is WordLevel"):
        export_checkpoint_gguf(tiny_llama_dir, tmp_path / "z.gguf", "f16")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_not_overwritten(bpe_llama_dir, tmp_path):
    path = tmp_path / "taken.gguf"
    path.write_text("keep me")
    with pytest.raises(AutopruneError, match="already exists"):
        export_checkpoint_gguf(bpe_llama_dir, path, "f16")
    assert path.read_text() == "keep me"


def searched_study(model_dir: Path, data_dir: Path, folder: Path, trials: int) -> dict:
    """A finished study over layer-wise sparsity and block removal, made through the CLI."""
    config = {
        "model": str(model_dir), "data": str(data_dir), "storage": f"sqlite:///{folder / 's.db'}",
        "study": "gguf", "trials": trials, "seeded": False, "population": 4, "space": "depth_layerwise",
        "seed": 6, "method": "sparsegpt", "sparsity_range": [0.3, 0.7], "eval_windows": 3,
        "min_windows": 1, "seq_len": 32, "calib_samples": 8, "cache_dir": str(folder / "cache"),
        **TRIALS_ONLY,
    }
    (folder / "search.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", "--config", str(folder / "search.yaml"), "--format", "json"]) == 0
    return config


def export_args(config: dict, trial: int, out: Path, *extra: str) -> list[str]:
    return ["export", "--storage", config["storage"], "--study", config["study"], "--trial", str(trial),
            "--out", str(out), "--cache-dir", config["cache_dir"], *extra]


def test_cli_export_gguf_matches_the_safetensors_export(bpe_llama_dir, data_dir, tmp_path, capsys):
    config = searched_study(bpe_llama_dir, data_dir, tmp_path, trials=6)
    study = optuna.load_study(study_name="gguf", storage=config["storage"])
    trial = max(study.best_trials, key=lambda t: len(t.user_attrs["plan"]["removed_blocks"]))
    out = tmp_path / "export"
    assert main(export_args(config, trial.number, out, "--format", "gguf", "--gguf-type", "f16")) == 0
    assert f"{out / 'model-f16.gguf'}" in capsys.readouterr().out
    checkpoint = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = reload(out / "model-f16.gguf")
    assert model.config.num_hidden_layers == 4 - len(trial.user_attrs["plan"]["removed_blocks"])
    windows = evaluation_windows(str(data_dir), AutoTokenizer.from_pretrained(out), 32, 4)
    assert abs(perplexity(model, windows) / perplexity(checkpoint, windows) - 1) < 0.01


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--format", "gguf", "--gguf-type", "q4_k"], "argument --gguf-type: invalid choice: 'q4_k'"),
        (["--gguf-type", "f16"], "--gguf-type needs --format gguf"),
    ],
)
def test_cli_bad_gguf_flags_write_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "export"
    code = main(export_args({"storage": f"sqlite:///{tmp_path / 'none.db'}", "study": "s",
                             "cache_dir": str(tmp_path)}, 0, out, *flags))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "none.db").exists()


def test_cli_export_of_a_model_gguf_cannot_express_leaves_nothing(tiny_llama_dir, data_dir, tmp_path, capsys):
    config = searched_study(tiny_llama_dir, data_dir, tmp_path, trials=2)  # a WordLevel tokenizer
    out = tmp_path / "export"
    out.mkdir()
    code = main(export_args(config, 0, out, "--format", "gguf"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the pruning's progress bars
    assert code == 2 and last.startswith("autoprune: error: GGUF export") and "WordLevel" in last
    assert err.count("autoprune:") == 1
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_model_from_a_gguf_keeps_that_files_tokenizer_metadata(bpe_llama_dir, tokenizer, tmp_path):
    """A checkpoint whose recipe names a .gguf (as the smollm2-135m alias does) copies the source's
    tokenizer.* fields verbatim. The checkpoint here carries a WordLevel tokenizer, which could not
    be converted: only the copy can succeed."""
    loaded = load_model(str(bpe_llama_dir))
    source = tmp_path / "source.gguf"
    write_gguf(loaded.model, loaded.tokenizer, source)
    checkpoint = tmp_path / "checkpoint"
    save_checkpoint(loaded.model, tokenizer, checkpoint, {"recipe": {"model": str(source)}}, torch.float32)
    copied = tmp_path / "copied.gguf"
    export_checkpoint_gguf(checkpoint, copied, "f16")
    want, got = gguf.GGUFReader(source).fields, gguf.GGUFReader(copied).fields
    names = sorted(name for name in want if name.startswith("tokenizer."))
    assert names == sorted(name for name in got if name.startswith("tokenizer."))
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"} <= set(names)
    for name in names:
        assert got[name].contents() == want[name].contents(), name


def test_a_block_without_ffn_is_written_without_its_ffn_tensors(bpe_llama_dir, tmp_path):
    loaded = load_model(str(bpe_llama_dir))
    del LlamaFamilyAdapter().blocks(loaded.model)[2].mlp  # a sub-network that dropped block 2's FFN
    path = tmp_path / "no-ffn.gguf"
    layout = write_gguf(loaded.model, loaded.tokenizer, path)
    assert layout.architecture == "deci" and layout.ffn == [128, 128, 0, 128]
    names = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    assert not any(name.startswith("blk.2.ffn_") for name in names)
    assert {"blk.2.attn_norm.weight", "blk.2.attn_q.weight", "blk.1.ffn_norm.weight"} <= names


def test_a_model_from_a_gguf_is_exported_in_bfloat16(bpe_llama_dir, tmp_path):
    """A GGUF's weights have no torch dtype of their own: its exports are written in bfloat16."""
    loaded = load_model(str(bpe_llama_dir))
    source = tmp_path / "source.gguf"
    write_gguf(loaded.model, loaded.tokenizer, source)
    from_gguf = load_model(str(source))
    assert from_gguf.source_dtype == torch.bfloat16 and loaded.source_dtype == torch.float32
    assert next(from_gguf.model.parameters()).dtype == torch.float32  # pruned in float32


def test_cli_export_gguf_of_a_per_block_subnet_trial(bpe_llama_dir, data_dir, tmp_path, capsys):
    """A ``subnet`` study's trial with per-block widths: the GGUF is written from the checkpoint
    (which autoprune reloads with its own modelling class) with each block's own widths."""
    config = tiny_config(bpe_llama_dir, data_dir, tmp_path, space="subnet", sparsity_range=None, trials=8)
    run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study, storage=config.storage)
    def widths(trial: optuna.trial.FrozenTrial) -> set[str]:
        structure = trial.user_attrs["plan"]["structure"] or {"blocks": {}}
        return {json.dumps(block, sort_keys=True) for block in structure["blocks"].values()}

    trial = next(t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if len(widths(t)) > 1)
    out = tmp_path / "export"
    args = export_args(config.model_dump(), trial.number, out, "--format", "gguf", "--gguf-type", "f16")
    assert main(args) == 0
    assert f"{out / 'model-f16.gguf'}" in capsys.readouterr().out
    checkpoint = load_model(str(out)).model
    assert checkpoint.config.is_heterogeneous
    fields = gguf.GGUFReader(out / "model-f16.gguf").fields
    assert fields["general.architecture"].contents() == "deci"
    blocks = LlamaFamilyAdapter().blocks(checkpoint)
    head_dim = checkpoint.config.head_dim
    heads = [b.self_attn.q_proj.out_features // head_dim if hasattr(b, "self_attn") else 0 for b in blocks]
    ffn = [b.mlp.gate_proj.out_features if hasattr(b, "mlp") else 0 for b in blocks]
    assert fields["deci.attention.head_count"].contents() == heads
    assert fields["deci.feed_forward_length"].contents() == ffn
    assert len(set(zip(heads, ffn))) > 1
