"""A LLaMA whose blocks differ: per-block heads, KV heads and FFN width, and sub-blocks skipped.

Shipped inside checkpoints that autoprune exports with per-block widths and loaded through the
config's ``auto_map`` with ``trust_remote_code=True``. The config is a plain ``LlamaConfig`` whose
per-block differences are written in transformers' own per-layer schema (``per_layer_config``,
from ``HeterogeneousConfigMixin``: per layer ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size`` and ``skip`` naming the sub-modules a layer does not have, ``self_attn`` or
``mlp``), and parameter names are LLaMA's, so a transformers release whose ``LlamaModel`` reads
``per_layer_config`` loads the same checkpoint natively. Each layer is built from stock
transformers modules given that layer's config, so the arithmetic is LLaMA's exactly.

This file imports nothing but torch and transformers: it must run from a checkpoint folder.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)


def layer_config(config, index: int):
    """The config of layer ``index``: its per-layer view when the config is heterogeneous."""
    return config.per_layer_config[index] if config.is_heterogeneous else config


class SubnetDecoderLayer(GradientCheckpointingLayer):
    """A LLaMA decoder layer whose attention or MLP sub-block may be absent (``skip``)."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        skip = set(getattr(config, "skip", None) or ())
        self.hidden_size = config.hidden_size
        if "self_attn" not in skip:
            self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if "mlp" not in skip:
            self.mlp = LlamaMLP(config)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                cache=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            attended, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        if hasattr(self, "mlp"):
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class SubnetLlamaModel(LlamaModel):
    """``LlamaModel`` with each layer built from its own per-layer config."""

    def __init__(self, config) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            SubnetDecoderLayer(layer_config(config, index), index)
            for index in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SubnetLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` over :class:`SubnetLlamaModel`."""

    def __init__(self, config) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SubnetLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
