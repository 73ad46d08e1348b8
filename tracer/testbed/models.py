"""Synthetic GGUF models that Ollama v0.13 loads and generates from, written offline.

Two shapes (reference/ollama-v0.13-internals.md §7):

* ``gemma3``: the new Go engine, with a realistic ~262k-token SentencePiece vocabulary and
  tiny layers. The vocabulary is what makes v0.13's per-request GGUF metadata scans cost
  what they cost on gemma3:4b; the layers only need to be big enough to run.
* ``llama``: a small model served by the llama.cpp runner.

The weights are random, but shaped so that end-of-generation tokens are never sampled: every
token embedding has a large constant component on hidden dimension 0, residual branches are
scaled down, and the output rows of control tokens point the other way on that dimension.
A first-stage stream therefore keeps streaming until the benchmark interrupts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_SPM_SPACE = "\u2581"  # SentencePiece's word-boundary marker

# Common English pieces so that prompts tokenize into plausible, multi-character tokens.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "more", "can", "said", "what", "about", "up",
    "out", "them", "into", "only", "time", "two", "may", "do", "any", "could", "new", "other",
    "some", "these", "than", "then", "like", "our", "first", "now", "over", "such", "how",
    "most", "also", "story", "write", "long", "about", "tell", "me", "a", "explain", "detail",
    "history", "world", "model", "token", "stream", "first", "second", "stage", "answer",
    "question", "continue", "please", "language", "people", "river", "city", "mountain",
    "describe",
)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one synthetic model."""

    name: str  # the Ollama model name it is registered under
    arch: str  # "gemma3" or "llama"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    context_length: int

    @property
    def filename(self) -> str:
        return f"{self.name.replace(':', '-')}.gguf"


GEMMA3_SPEC = ModelSpec(
    name="tracer-gemma3:test",
    arch="gemma3",
    vocab_size=262_144,
    hidden=64,
    layers=2,
    heads=2,
    kv_heads=1,
    head_dim=32,
    ff=128,
    context_length=8192,
)

LLAMA_SPEC = ModelSpec(
    name="tracer-llama:test",
    arch="llama",
    vocab_size=1024,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=4,
    head_dim=16,
    ff=128,
    context_length=8192,
)

SPECS = (GEMMA3_SPEC, LLAMA_SPEC)


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    scores: np.ndarray  # float32
    token_types: np.ndarray  # int32
    bos_id: int
    eos_id: int
    unk_id: int

    @property
    def control_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.token_types) if t == TOKEN_CONTROL]


def build_vocabulary(spec: ModelSpec) -> Vocabulary:
    """A SentencePiece-style vocabulary of exactly ``spec.vocab_size`` unique tokens."""
    tokens: list[str] = []
    types: list[int] = []
    if spec.arch == "gemma3":
        # Gemma's layout: pad, eos, bos, unk, unused slots, then turn markers at 105/106
        # (Ollama appends eot_token_id=106 to the EOS set).
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        specials += [f"<unused{i}>" for i in range(105 - len(specials))]
        specials += ["<start_of_turn>", "<end_of_turn>"]
        bos_id, eos_id, unk_id = 2, 1, 3
    else:
        specials = ["<unk>", "<s>", "</s>"]
        bos_id, eos_id, unk_id = 1, 2, 0
    for token in specials:
        tokens.append(token)
        if token == specials[unk_id]:
            types.append(TOKEN_UNKNOWN)
        elif token.startswith("<unused"):
            types.append(TOKEN_UNUSED)
        else:
            types.append(TOKEN_CONTROL)
    # Byte fallback tokens: without them llama.cpp throws on unseen characters.
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TOKEN_BYTE)
    seen = set(tokens)
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    pieces += list("0123456789.,;:!?'\"()-")
    pieces += [_SPM_SPACE] + [_SPM_SPACE + w for w in _WORDS] + list(_WORDS)
    for piece in pieces:
        if piece not in seen and len(tokens) < spec.vocab_size:
            seen.add(piece)
            tokens.append(piece)
            types.append(TOKEN_NORMAL)
    # Filler pieces with realistic lengths (gemma3's tokens average 6-8 bytes).
    index = 0
    while len(tokens) < spec.vocab_size:
        piece = f"{_SPM_SPACE}w{index:06d}"
        index += 1
        tokens.append(piece)
        types.append(TOKEN_NORMAL)
    scores = np.zeros(len(tokens), dtype=np.float32)
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # Longer pieces score higher, so SentencePiece prefers whole words over letters.
        scores[i] = -1000.0 if kind != TOKEN_NORMAL else -float(i) / len(tokens) + len(token)
    return Vocabulary(
        tokens=tokens,
        scores=scores,
        token_types=np.asarray(types, dtype=np.int32),
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=unk_id,
    )


def _tensors(spec: ModelSpec, vocab: Vocabulary, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tensors keyed by GGUF name. numpy shapes are [out, in]; GGUF stores ne as [in, out]."""
    h, ff = spec.hidden, spec.ff
    q_dim = spec.heads * spec.head_dim
    kv_dim = spec.kv_heads * spec.head_dim

    def weight(out_dim: int, in_dim: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * scale).astype(np.float32)

    def ones(n: int, value: float = 1.0) -> np.ndarray:
        return np.full(n, value, dtype=np.float32)

    embedding = weight(spec.vocab_size, h, 0.05)
    embedding[:, 0] = 1.0  # the dominant direction every hidden state keeps
    output = weight(spec.vocab_size, h, 0.05)
    output[:, 0] = 0.0
    output[vocab.control_ids, 0] = -4.0  # EOS/EOT logits far below every other token

    tensors: dict[str, np.ndarray] = {}
    if spec.arch == "gemma3":
        tensors["token_embd.weight"] = embedding.astype(np.float16)
    else:
        tensors["token_embd.weight"] = embedding
    tensors["output_norm.weight"] = ones(h)
    tensors["output.weight"] = output
    for layer in range(spec.layers):
        p = f"blk.{layer}."
        tensors[p + "attn_norm.weight"] = ones(h)
        tensors[p + "attn_q.weight"] = weight(q_dim, h)
        tensors[p + "attn_k.weight"] = weight(kv_dim, h)
        tensors[p + "attn_v.weight"] = weight(kv_dim, h)
        tensors[p + "attn_output.weight"] = weight(h, q_dim)
        tensors[p + "ffn_norm.weight"] = ones(h)
        tensors[p + "ffn_gate.weight"] = weight(ff, h)
        tensors[p + "ffn_up.weight"] = weight(ff, h)
        tensors[p + "ffn_down.weight"] = weight(h, ff)
        if spec.arch == "gemma3":
            tensors[p + "attn_q_norm.weight"] = ones(spec.head_dim)
            tensors[p + "attn_k_norm.weight"] = ones(spec.head_dim)
            # Small post-norms keep the residual branches from overturning dimension 0.
            tensors[p + "post_attention_norm.weight"] = ones(h, 0.01)
            tensors[p + "post_ffw_norm.weight"] = ones(h, 0.01)
    return tensors


def _write_metadata(writer: gguf.GGUFWriter, spec: ModelSpec, vocab: Vocabulary) -> None:
    arch = spec.arch
    # Counts and lengths must be UINT32 and eps/rope FLOAT32: Ollama reads KVs with typed
    # assertions and silently falls back to defaults on a type mismatch (§7.0).
    writer.add_string("general.name", spec.name)
    writer.add_uint32(f"{arch}.context_length", spec.context_length)
    writer.add_uint32(f"{arch}.embedding_length", spec.hidden)
    writer.add_uint32(f"{arch}.block_count", spec.layers)
    writer.add_uint32(f"{arch}.feed_forward_length", spec.ff)
    writer.add_uint32(f"{arch}.attention.head_count", spec.heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", spec.kv_heads)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    if arch == "gemma3":
        writer.add_uint32(f"{arch}.attention.key_length", spec.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", spec.head_dim)
        writer.add_uint32(f"{arch}.attention.sliding_window", 1024)
        writer.add_float32(f"{arch}.rope.local.freq_base", 10000.0)
    else:
        writer.add_uint32(f"{arch}.rope.dimension_count", spec.head_dim)
    writer.add_string("tokenizer.ggml.model", "llama")
    writer.add_array("tokenizer.ggml.tokens", vocab.tokens)
    writer.add_array("tokenizer.ggml.scores", vocab.scores.tolist())
    writer.add_array("tokenizer.ggml.token_type", vocab.token_types.tolist())
    writer.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    writer.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", vocab.unk_id)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)


def write_model(spec: ModelSpec, path: Path, seed: int = 0) -> Path:
    """Write ``spec`` as a GGUF file at ``path`` (atomically) and return the path."""
    rng = np.random.default_rng(seed)
    vocab = build_vocabulary(spec)
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), spec.arch)
    _write_metadata(writer, spec, vocab)
    for name, tensor in _tensors(spec, vocab, rng).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


MODELFILE = "FROM ./{filename}\n"
