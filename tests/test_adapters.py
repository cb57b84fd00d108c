from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoprune.errors import AutopruneError
from autoprune.models import ArchitectureAdapter, LlamaFamilyAdapter, OPTAdapter, load_model


@pytest.mark.parametrize(("fixture", "adapter_type"), [("tiny_llama_dir", LlamaFamilyAdapter), ("tiny_opt_dir", OPTAdapter)])
def test_adapter_finds_every_linear_layer_of_every_block(request, fixture, adapter_type):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    assert isinstance(loaded.adapter, adapter_type)
    names = loaded.adapter.all_layer_names(loaded.model)
    linears = {
        n for n, m in loaded.model.named_modules()
        if isinstance(m, torch.nn.Linear) and loaded.adapter.blocks_path in n
    }
    assert set(names) == linears
    block, linear = loaded.adapter.split_layer_name(names[-1])
    assert block == loaded.adapter.num_blocks(loaded.model) - 1 and linear in loaded.adapter.linear_names


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_removed_blocks_save_reload_and_generate(request, fixture, tmp_path):
    loaded = load_model(str(request.getfixturevalue(fixture)))
    loaded.adapter.remove_blocks(loaded.model, [0, 2])
    loaded.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == loaded.adapter.num_blocks(loaded.model)
    prompt = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        expected = loaded.model(prompt).logits
        torch.testing.assert_close(reloaded(prompt).logits, expected)
        generated = reloaded.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    assert generated.shape == (1, 7)


def test_without_blocks_restores_the_model(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    prompt = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        before = loaded.model(prompt).logits
        with loaded.adapter.without_blocks(loaded.model, [1]):
            assert loaded.model.config.num_hidden_layers == 3
            during = loaded.model(prompt).logits
        after = loaded.model(prompt).logits
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after)
    assert loaded.model.config.num_hidden_layers == 4


def test_unsupported_family_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(AutopruneError, match="model type 'gpt2' has no architecture adapter"):
        ArchitectureAdapter.for_model(model)
