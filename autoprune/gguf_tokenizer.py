"""The tokenizer half of a GGUF file: llama.cpp's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.json``; llama.cpp and transformers both rebuild the tokenizer from
the vocabulary, merges, token types, special ids and the name of the pre-tokenizer (the regex that
splits text before BPE). Where the model came from a GGUF (the ``smollm2-135m`` alias), that file's
tokenizer metadata is copied verbatim, so the export tokenizes exactly as the original. Otherwise
the metadata is built from the checkpoint's byte-level BPE tokenizer; a tokenizer whose splitting
llama.cpp has no name for is refused rather than written with the wrong one.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from transformers import PreTrainedTokenizerBase

from autoprune.errors import AutopruneError

#: Pre-tokenizers of ``tokenizer.json`` that llama.cpp knows, as (kinds in order) -> its name.
#: GPT-2's byte-level split alone is ``gpt2``; digits split one by one first is ``smollm``.
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel",): "gpt2",
    ("Digits", "ByteLevel"): "smollm",
}


def copy_tokenizer_metadata(writer: gguf.GGUFWriter, source: Path, vocab_rows: int) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF ``source`` into ``writer``."""
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_rows:
        raise AutopruneError(
            f"GGUF export: the tokenizer of {source.name} does not match the model's "
            f"{vocab_rows} embedding rows"
        )
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main_type, sub_type=sub_type)


def write_tokenizer_metadata(
    writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_rows: int
) -> None:
    """Describe a byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) the way llama.cpp reads it.

    Embedding rows beyond the tokenizer's vocabulary become unused ``[PAD<i>]`` tokens, since
    llama.cpp wants one token per row."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise AutopruneError("GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise AutopruneError(
            f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')}"
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_rows:
        raise AutopruneError(
            f"GGUF export: the tokenizer has {len(vocab)} tokens, the model {vocab_rows} rows"
        )
    by_id = {index: token for token, index in vocab.items()}
    special = {added["content"] for added in spec.get("added_tokens", []) if added.get("special")}
    added = {added["content"] for added in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(
                gguf.TokenType.CONTROL if token in special
                else gguf.TokenType.USER_DEFINED if token in added
                else gguf.TokenType.NORMAL
            )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)
    for attribute, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer, or a one-line refusal."""
    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else [])
    kinds = tuple(step.get("type", "?") for step in steps)
    name = KNOWN_PRE_TOKENIZERS.get(kinds)
    if name == "smollm" and not steps[0].get("individual_digits"):
        name = None
    if name is None or not all(s.get("use_regex", True) for s in steps if s["type"] == "ByteLevel"):
        raise AutopruneError(
            f"GGUF export: llama.cpp has no name for the pre-tokenizer {'+'.join(kinds) or 'none'}"
        )
    return name
