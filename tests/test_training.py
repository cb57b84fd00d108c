"""Healing: the chunked distillation loss, zeros kept, resumption, the command and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import prune_args, run_cli, save_tiny_model, tiny_llama_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from autoprune.models import load_model
from autoprune.training import (
    IGNORE,
    FolderCheckpoints,
    HealConfig,
    distillation_loss,
    heal,
    plain_distillation_loss,
)

#: A heal small enough for a tiny model: 6 steps of 2 windows of 16 tokens.
TINY_HEAL = dict(tokens=6 * 2 * 16, seq_len=16, batch_size=2, lr=3e-4, warmup=0.2,
                 validation_windows=2, evaluations=2, checkpoint_every=2)


def heal_args(model: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_HEAL.items()]
    return ["heal", "--model", model, "--data", data_dir, "--out", out, *flags, "--format", "json", *extra]


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.3), (1.0, 1.0)])
def test_chunked_loss_and_gradients_match_whole_logits(temperature: float, ce_weight: float) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(37, 12, generator=generator), torch.randn(50, 12, generator=generator)
    labels = torch.randint(0, 50, (37,), generator=generator)
    labels[::5] = IGNORE
    chunked = distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, temperature, ce_weight, chunk=8)
    chunked.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = plain_distillation_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels, temperature, ce_weight)
    plain.backward()
    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, rtol=1e-4, atol=1e-6)


def test_heal_keeps_every_zero_and_moves_toward_the_teacher(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, pruned, "--method", "wanda", "--sparsity", "0.5"))[0] == 0
    code, out, err = run_cli(capsys, *heal_args(pruned, data_dir, tmp_path / "healed"))
    assert code == 0, err
    report = json.loads(out)
    measurements = report["heal"]["result"]["measurements"]
    assert measurements[-1]["kl"] < measurements[0]["kl"]
    assert report["heal"]["result"]["masked_layers"] == 4 * 7
    before = load_file(pruned / "model.safetensors")
    after = load_file(tmp_path / "healed" / "model.safetensors")
    for name, tensor in before.items():
        if name.endswith("proj.weight"):
            assert torch.equal(after[name] == 0, tensor == 0), name
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed  # it trained
    assert json.loads((tmp_path / "healed" / "autoprune.json").read_text())["heal"]["teacher"] == str(tiny_llama_dir)
    assert not (tmp_path / ".healed.heal-checkpoints").exists()  # removed once the model is saved


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_heal_killed_and_resumed_ends_with_the_uninterrupted_weights(tiny_llama_dir, data_dir, tmp_path) -> None:
    config = HealConfig(**TINY_HEAL)
    teacher = load_model(str(tiny_llama_dir))

    def student():
        model = load_model(str(tiny_llama_dir)).model
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0  # a sparse layer among dense ones
        return model

    uninterrupted, result = heal(student(), teacher, str(data_dir), config, progress=False)
    saved = FolderCheckpoints(tmp_path / "checkpoints", "student")
    _, cut = heal(student(), teacher, str(data_dir), config, checkpoints=saved, progress=False, stop_after=3)
    assert cut.steps == 3  # killed after step 3; the last checkpoint is step 2
    resumed, result2 = heal(student(), teacher, str(data_dir), config, checkpoints=saved, progress=False)
    assert result2.resumed_from == 2 and result2.steps == config.steps == 6
    expected, got = _weights(uninterrupted), _weights(resumed)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [m.ppl for m in result2.measurements] == [m.ppl for m in result.measurements]


def test_a_heal_leaves_its_teacher_as_it_was_given(tiny_llama_dir, data_dir) -> None:
    """Neither frozen nor given gradients: a student copied from it later trains (a learned
    structure's), and a search worker's model stays what it was."""
    teacher = load_model(str(tiny_llama_dir))
    student = load_model(str(tiny_llama_dir)).model
    heal(student, teacher, str(data_dir), HealConfig(**TINY_HEAL, precision="fp32"), progress=False)
    assert all(p.requires_grad and p.grad is None for p in teacher.model.parameters())


def test_a_checkpoint_of_other_settings_or_another_student_is_refused(tiny_llama_dir, data_dir, tmp_path) -> None:
    teacher = load_model(str(tiny_llama_dir))
    saved = FolderCheckpoints(tmp_path / "checkpoints", "student")
    heal(load_model(str(tiny_llama_dir)).model, teacher, str(data_dir), HealConfig(**TINY_HEAL),
         checkpoints=saved, progress=False, stop_after=2)
    other = HealConfig(**{**TINY_HEAL, "lr": 1e-3})
    with pytest.raises(Exception, match="other settings"):
        heal(load_model(str(tiny_llama_dir)).model, teacher, str(data_dir), other, checkpoints=saved, progress=False)
    with pytest.raises(Exception, match="another student"):
        heal(load_model(str(tiny_llama_dir)).model, teacher, str(data_dir), HealConfig(**TINY_HEAL),
             checkpoints=FolderCheckpoints(tmp_path / "checkpoints", "other"), progress=False)


def test_lora_heal_merges_adapters_and_keeps_zeros(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, pruned, "--method", "wanda", "--nm", "2:4"))[0] == 0
    code, out, err = run_cli(capsys, *heal_args(pruned, data_dir, tmp_path / "healed", "--lora", "4"))
    assert code == 0, err
    after = load_file(tmp_path / "healed" / "model.safetensors")
    assert not [name for name in after if "lora" in name]
    before = load_file(pruned / "model.safetensors")
    assert set(after) == set(before)
    for name, tensor in before.items():
        if name.endswith("proj.weight"):
            assert torch.equal(after[name] == 0, tensor == 0), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("proj.weight"))
    embeddings = "model.embed_tokens.weight"
    assert torch.equal(before[embeddings], after[embeddings])  # LoRA trains the adapters only


def test_a_healed_sub_network_keeps_its_widths(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    cut = tmp_path / "cut"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, cut, "--structured", "heads=2,ffn=64"))[0] == 0
    code, _, err = run_cli(capsys, *heal_args(cut, data_dir, tmp_path / "healed"))
    assert code == 0, err
    before = AutoModelForCausalLM.from_pretrained(cut)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert {n: p.shape for n, p in before.named_parameters()} == {n: p.shape for n, p in after.named_parameters()}


def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir, data_dir, tokenizer, tmp_path, capsys) -> None:
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, pruned, "--method", "wanda", "--sparsity", "0.5"))[0] == 0
    other_vocab = tiny_llama_config(len(tokenizer) + 8)
    foreign_vocab = save_tiny_model(other_vocab, tokenizer, tmp_path / "other-vocab")
    stranger = tmp_path / "stranger"  # same shapes, other weights: not the model it was cut from
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer))).save_pretrained(stranger)
    tokenizer.save_pretrained(stranger)
    out = tmp_path / "healed"
    cases = {
        "vocabulary": heal_args(pruned, data_dir, out, "--teacher", foreign_vocab),
        "not cut from teacher": heal_args(pruned, data_dir, out, "--teacher", stranger),
        "tokens": heal_args(pruned, data_dir, out, "--tokens", "0"),
        "data path not found": heal_args(pruned, tmp_path / "missing", out),
        "names no model": heal_args(stranger, data_dir, out),
        "--workers must be at least 1": heal_args(pruned, data_dir, out, "--workers", "0"),
        "does not split over 3 workers": heal_args(pruned, data_dir, out, "--workers", "3"),
    }
    capsys.readouterr()
    for expected, args in cases.items():
        code, _, err = run_cli(capsys, *args)
        assert code == 2, expected
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
        assert not list(tmp_path.glob(".healed*"))


def test_data_free_heal_trains_on_text_the_teacher_writes(tiny_llama_dir, data_dir, tmp_path, capsys) -> None:
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(tiny_llama_dir, data_dir, pruned, "--method", "wanda", "--sparsity", "0.5"))[0] == 0
    code, out, err = run_cli(capsys, *heal_args(pruned, "self", tmp_path / "healed", "--cache-dir", tmp_path / "cache"))
    assert code == 0, err
    report = json.loads(out)
    assert report["ppl"] is None and report["heal"]["data"] == "self"  # no test split to report on
    assert list((tmp_path / "cache" / "self-text").glob("*.safetensors"))  # generated once, cached
