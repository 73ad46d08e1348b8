"""The synthetic models carry the metadata types and tensor shapes Ollama v0.13 requires (§7)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
from ollama_tracer.testbed.models import (
    GEMMA3_SPEC,
    LLAMA_SPEC,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    ModelSpec,
    build_vocabulary,
    write_model,
)

T = gguf.GGUFValueType
# Shrunk copies: the shapes and types are what matter, and a 262k vocabulary is slow to read back.
SMALL_GEMMA3 = dataclasses.replace(GEMMA3_SPEC, vocab_size=2048)
SMALL_LLAMA = dataclasses.replace(LLAMA_SPEC, vocab_size=512)


def _read(spec: ModelSpec, tmp_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(write_model(spec, tmp_path / spec.filename))


def _field_type(reader: gguf.GGUFReader, key: str) -> tuple[T, T | None]:
    field = reader.fields[key]
    main = field.types[0]
    return main, (field.types[1] if main == T.ARRAY else None)


def _tensor_shapes(reader: gguf.GGUFReader) -> dict[str, list[int]]:
    # GGUF ne order is [in, out], which is what the reference tables list.
    return {t.name: [int(x) for x in t.shape] for t in reader.tensors}


@pytest.mark.parametrize("spec", [SMALL_GEMMA3, SMALL_LLAMA], ids=["gemma3", "llama"])
def test_metadata_types(spec: ModelSpec, tmp_path: Path) -> None:
    reader = _read(spec, tmp_path)
    arch = spec.arch
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == arch
    for key in ("context_length", "embedding_length", "block_count", "attention.head_count",
                "attention.head_count_kv"):
        assert _field_type(reader, f"{arch}.{key}") == (T.UINT32, None), key
    assert _field_type(reader, f"{arch}.attention.layer_norm_rms_epsilon") == (T.FLOAT32, None)
    assert _field_type(reader, f"{arch}.rope.freq_base") == (T.FLOAT32, None)
    assert _field_type(reader, "tokenizer.ggml.tokens") == (T.ARRAY, T.STRING)
    assert _field_type(reader, "tokenizer.ggml.scores") == (T.ARRAY, T.FLOAT32)
    assert _field_type(reader, "tokenizer.ggml.token_type") == (T.ARRAY, T.INT32)
    assert _field_type(reader, "tokenizer.ggml.bos_token_id") == (T.UINT32, None)
    assert _field_type(reader, "tokenizer.ggml.eos_token_id") == (T.UINT32, None)
    assert _field_type(reader, "tokenizer.ggml.add_bos_token") == (T.BOOL, None)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == spec.vocab_size
    if arch == "gemma3":
        # Without these, Ollama defaults head_dim to 256 and the tiny tensors do not fit.
        assert _field_type(reader, "gemma3.attention.key_length") == (T.UINT32, None)
        assert _field_type(reader, "gemma3.attention.value_length") == (T.UINT32, None)
    else:
        # llama.cpp rejects rope.dimension_count unless it equals embedding/heads ("invalid n_rot").
        n_rot = reader.fields["llama.rope.dimension_count"].parts[-1][0]
        assert n_rot == spec.hidden // spec.heads


@pytest.mark.parametrize("spec", [SMALL_GEMMA3, SMALL_LLAMA], ids=["gemma3", "llama"])
def test_tensor_shapes(spec: ModelSpec, tmp_path: Path) -> None:
    shapes = _tensor_shapes(_read(spec, tmp_path))
    h, v, ff = spec.hidden, spec.vocab_size, spec.ff
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    expected = {"token_embd.weight": [h, v], "output_norm.weight": [h], "output.weight": [h, v]}
    for i in range(spec.layers):
        p = f"blk.{i}."
        expected |= {
            p + "attn_norm.weight": [h], p + "attn_q.weight": [h, q], p + "attn_k.weight": [h, kv],
            p + "attn_v.weight": [h, kv], p + "attn_output.weight": [q, h], p + "ffn_norm.weight": [h],
            p + "ffn_gate.weight": [h, ff], p + "ffn_up.weight": [h, ff], p + "ffn_down.weight": [ff, h],
        }
        if spec.arch == "gemma3":
            expected |= {
                p + "attn_q_norm.weight": [spec.head_dim], p + "attn_k_norm.weight": [spec.head_dim],
                p + "post_attention_norm.weight": [h], p + "post_ffw_norm.weight": [h],
            }
    # Exactly these: llama.cpp rejects a file with extra tensors ("wrong number of tensors").
    assert shapes == expected


def test_vocabulary_is_realistic_for_gemma3() -> None:
    vocab = build_vocabulary(GEMMA3_SPEC)
    assert len(vocab.tokens) == 262_144 == len(set(vocab.tokens))
    assert (vocab.bos_id, vocab.eos_id) == (2, 1)
    assert vocab.tokens[106] == "<end_of_turn>"  # Ollama appends eot 106 to the EOS set
    types = vocab.token_types
    assert int(np.sum(types == TOKEN_BYTE)) == 256
    assert vocab.tokens[int(np.argmax(types == TOKEN_BYTE))] == "<0x00>"
    assert {vocab.eos_id, 106} <= set(vocab.control_ids)
    assert np.mean([len(t) for t in vocab.tokens]) >= 6


def test_llama_vocabulary_has_spm_specials_and_bytes() -> None:
    vocab = build_vocabulary(LLAMA_SPEC)
    assert vocab.tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert [vocab.tokens[i] for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert int(np.sum(vocab.token_types == TOKEN_CONTROL)) == 2


def test_end_of_generation_tokens_are_suppressed(tmp_path: Path) -> None:
    """Random weights must not end a first-stage stream before the benchmark interrupts it."""
    reader = _read(SMALL_LLAMA, tmp_path)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    output = tensors["output.weight"].reshape(SMALL_LLAMA.vocab_size, SMALL_LLAMA.hidden)
    embedding = tensors["token_embd.weight"].reshape(SMALL_LLAMA.vocab_size, SMALL_LLAMA.hidden)
    assert np.all(embedding[:, 0] == 1.0)
    vocab = build_vocabulary(SMALL_LLAMA)
    assert np.all(output[vocab.control_ids, 0] < -1.0)
    normal = np.setdiff1d(np.arange(SMALL_LLAMA.vocab_size), vocab.control_ids)
    assert np.all(output[normal, 0] == 0.0)
