"""Checkpoints as users run them: loaded with stock ``from_pretrained``, an unstructured, an
equal-width and a per-block export each ``generate`` with the KV cache (every step after the prompt
feeds one token) and say ``use_cache: true``, whatever calibration set in memory; weights are
written in the source's dtype unless ``--dtype`` says otherwise, and the report's bytes are the
files'; autoprune loads its own per-block exports; a bad ``--dtype`` writes nothing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import prune_args, run_cli, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoprune.latency import LatencyTable
from autoprune.models import load_model
from autoprune.study import load_existing_study, run_search

#: A per-block plan: blocks of different widths, a dropped attention, a removed block.
PER_BLOCK = {"schema_version": 2, "removed_blocks": [3], "structure": {
    "method": "obs", "blocks": {"0": {"ffn": 40}, "1": {"drop_attention": True}, "2": {"kv_groups": 1}}}}
KINDS = ("unstructured", "equal widths", "per-block")


@pytest.fixture(scope="module")
def bf16_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA published in bfloat16, as today's causal LMs are."""
    folder = tmp_path_factory.mktemp("bf16-llama")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def export(capsys, kind: str, model_dir: Path, data_dir: Path, out: Path, *extra: str) -> dict:
    """``autoprune prune`` of ``model_dir`` into ``out`` as ``kind``; its JSON report."""
    if kind == "per-block":
        recipe = out.parent / f"{out.name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": str(model_dir), "plan": PER_BLOCK,
            "calibration": {"source": str(data_dir), "n_samples": 8, "seq_len": 32, "seed": 0},
        }))
        args = ["prune", "--recipe", recipe, "--data", data_dir, "--seq-len", 32, "--eval-windows", 4,
                "--out", out, "--format", "json", *extra]
    else:
        flags = ["--method", "sparsegpt", "--sparsity", "0.5"] if kind == "unstructured" else ["--structured", "heads=2,ffn=64"]
        args = prune_args(model_dir, data_dir, out, *flags, *extra)
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0
    return json.loads(stdout)


def reload(out: Path) -> AutoModelForCausalLM:
    """The export as a user loads it: stock transformers, the shipped code for per-block widths."""
    remote = "auto_map" in json.loads((out / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)


def data_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its length prefix and header."""
    with path.open("rb") as handle:
        (header,) = struct.unpack("<Q", handle.read(8))
    return path.stat().st_size - 8 - header


def tensors(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(out / "model.safetensors", "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("kind", KINDS)
def test_an_export_generates_with_the_cache_in_the_sources_dtype(capsys, bf16_llama_dir, data_dir, tmp_path, kind):
    out = tmp_path / "export"
    report = export(capsys, kind, bf16_llama_dir, data_dir, out)
    config = json.loads((out / "config.json").read_text())
    assert config["use_cache"] is True and config["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text()).get("use_cache", True) is True
    assert {tensor.dtype for tensor in tensors(out).values()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644  # readable by whoever it is shared with
    assert report["dtype"] == "bfloat16" and report["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert data_bytes(out / "model.safetensors") == 2 * report["total_params"]  # tied weights once
    assert json.loads((out / "autoprune.json").read_text())["checkpoint"] == {
        "dtype": "bfloat16", "weight_bytes": report["checkpoint_bytes"]}

    model = reload(out)
    fed: list[int] = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    prompt = torch.arange(3, 11).unsqueeze(0)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert model(prompt).past_key_values is not None  # a plain forward returns its cache too
    assert generated.shape == (1, 13)
    assert fed[:5] == [8, 1, 1, 1, 1]


@pytest.mark.parametrize("kind", KINDS)
def test_dtype_chooses_what_is_written_and_nothing_else(capsys, bf16_llama_dir, data_dir, tmp_path, kind):
    """float32 and float16 exports hold what the bfloat16 one holds, each rounded to its dtype only
    when written: the model in memory is pruned in float32 whatever the files hold."""
    written = {}
    for dtype in ("float32", "float16", None):
        out = tmp_path / str(dtype)
        report = export(capsys, kind, bf16_llama_dir, data_dir, out, *(["--dtype", dtype] if dtype else []))
        assert report["dtype"] == (dtype or "bfloat16")
        assert json.loads((out / "config.json").read_text())["dtype"] == report["dtype"]
        itemsize = torch.empty(0, dtype=getattr(torch, report["dtype"])).element_size()
        assert data_bytes(out / "model.safetensors") == itemsize * report["total_params"]
        written[dtype] = tensors(out)
    for name, full in written["float32"].items():
        assert full.dtype == torch.float32
        assert torch.equal(full.to(torch.bfloat16), written[None][name]), name
        assert torch.equal(full.to(torch.float16), written["float16"][name]), name


def test_a_float32_source_is_written_in_float32_and_reloads_exactly(capsys, tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "export"
    report = export(capsys, "per-block", tiny_llama_dir, data_dir, out)
    assert report["dtype"] == "float32"
    code, stdout, _ = run_cli(capsys, "eval", "--model", out, "--data", data_dir, "--seq-len", 32,
                              "--eval-windows", 4, "--format", "json")
    assert code == 0  # autoprune loads its own per-block export with its own class
    assert json.loads(stdout)[0]["ppl"] == pytest.approx(report["ppl"], rel=1e-5)
    loaded = load_model(str(out))
    assert loaded.source_dtype == torch.float32 and loaded.model.config.num_hidden_layers == 3
    assert type(loaded.model).__name__ == "SubnetLlamaForCausalLM"


@pytest.mark.parametrize("command", ["prune", "export"])
def test_an_unknown_dtype_is_one_line_and_writes_nothing(capsys, tiny_llama_dir, data_dir, tmp_path, command):
    out = tmp_path / "out"
    if command == "prune":
        args = prune_args(tiny_llama_dir, data_dir, out, "--sparsity", "0.5", "--dtype", "int8")
    else:
        args = ["export", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study", "s", "--trial", 0,
                "--out", out, "--dtype", "int8"]
    code, _, stderr = run_cli(capsys, *args)
    assert code == 2 and stderr.count("\n") == 1
    assert "argument --dtype: invalid choice: 'int8'" in stderr and "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "s.db").exists()


def test_a_subnet_study_prices_latency_in_the_dtype_its_exports_are_written_in(bf16_llama_dir, data_dir, tmp_path):
    """A bf16 model's exports load and run in bf16, so its study's latency table times bf16 probes
    (a float32 table prices another ratio to the dense model)."""
    config = tiny_config(bf16_llama_dir, data_dir, tmp_path, space="subnet", sparsity_range=None, trials=2)
    run_search(config, progress=False)
    (table,) = (tmp_path / "cache" / "latency").glob("*.json")
    assert table.stem.endswith("-bfloat16")
    assert LatencyTable.from_json(table.read_text()).settings.dtype == "bfloat16"
    study = load_existing_study(config.storage, config.study)
    assert study.user_attrs["latency_table"] == LatencyTable.from_json(table.read_text()).digest
