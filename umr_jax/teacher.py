"""The teacher: log P(query | passage) from a generative LM, UMR's pseudo labels.

Step 3 of a UMR round. For every (query, passage) pair the LM reads

    Passage: {title} {text}. Please write a question based on this passage in {Language}.

and scores the target ``Question: {query}``: the mean (default, as the official
code) or the sum (as T5X's scorer) of the target tokens' log-probabilities. Two
model families share this file:

  * encoder-decoder (mT5, the paper's teacher): the prompt is the encoder
    input, the target the decoder's labels (``</s>`` included, as the official
    code);
  * decoder-only (Gemma 3, the embedded default): the prompt is the prefix and
    the target is scored after it; only target positions count.

Speed comes from the shapes, not tricks: pairs are packed several to a row
(by default; mT5 packs prompts into encoder rows and the same pairs' targets
into decoder rows) or bucketed by prompt and by target length into a few
padded shapes (one compiled program each, reused for millions of pairs), the
LM head runs only at target positions, and the log-softmax is a log-sum-exp over
vocabulary chunks plus the label's own logit, so the (tokens x 262k) logit
matrix is never materialised. Parameters are placed on the mesh by their
logical axes and batches split over ``data``.

The file reads top to bottom: the config; :class:`Prompter` (what the LM reads:
prompt and target text, token ids, truncation); the four batch layouts (how
pairs become padded or packed arrays, and the model call on them); and
:class:`Teacher`, which picks the layout and runs the one scoring loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from umr_jax import sharding
from umr_jax.batching import (
    PackedBatch,
    PairGroup,
    bucket_for,
    chunk_rows,
    dispatch_ahead,
    fill_packed,
    pack_pair_rows,
    pad_rows,
    plan_packed,
    plan_pair_groups,
)
from umr_jax.data.languages import LANGUAGE_NAMES, language_name
from umr_jax.models.layers import resolve_auto_dtype, set_scan_layers

REDUCTIONS = ("mean", "sum")
TRUNCATIONS = ("input", "passage")
OFFICIAL_INPUT_TEMPLATE = "Passage: {title} {text}. Please write a question based on this passage in {language}."


def default_config() -> ml_collections.ConfigDict:
    """Teacher section of a run config; defaults = Gemma-3-270M from the PyPI GGUF packages."""
    cfg = ml_collections.ConfigDict()
    # 'gemma3' (decoder-only) or 'mt5' (encoder-decoder, the paper's teacher).
    cfg.model = "gemma3"
    # gemma3: 'gguf' | 'gguf:/path/model.gguf' | HF directory | hub id (google/gemma-3-270m).
    # mt5: HF directory | hub id (google/mt5-xl, an mT5-XL LM-adapt directory).
    cfg.checkpoint = "gguf"
    cfg.tokenizer = ""  # '' = the checkpoint's own tokenizer
    # 'auto' = bfloat16 where the hardware multiplies it natively (TPU, GPU, CPUs
    # with AMX/AVX512-BF16: 2x the float32 rate in bench/score.py, mean
    # log-probs within ~0.04 of float32, rank correlation 0.9998), else
    # float32. Logits and log-softmax are float32 either way.
    cfg.param_dtype = "auto"
    cfg.dtype = "auto"
    # The official prompt. It doubles the full stop when a passage already ends
    # with one ("..") -- kept as the default for fidelity; edit to taste.
    cfg.input_template = OFFICIAL_INPUT_TEMPLATE
    cfg.target_template = "Question: {query}"
    cfg.separator = " "  # decoder-only: text between the prompt and the target
    cfg.target_eos = False  # decoder-only: also score the EOS token after the target
    cfg.reduction = "mean"  # 'mean' (official) or 'sum' (T5X) of target-token log-probs
    cfg.max_input_length = 512
    cfg.max_target_length = 128
    # 'input': cut the tokenized prompt at max_input_length (the official code;
    # a long passage loses the instruction at the end). 'passage': shorten the
    # passage text so the instruction survives.
    cfg.truncation = "input"
    # An unknown language code is an error; set e.g. 'English' to use that
    # language name in the prompt for every unknown code instead.
    cfg.unknown_language_name = ""
    # Pack several pairs into each row (attention only within a pair, positions
    # restarting per sequence) and run the LM head on a flat list of exactly
    # the target positions: ~95% of the compute is then on real tokens instead
    # of ~75% / ~50% (body / head) with padded buckets. Decoder-only: prompt +
    # target sequences in rows of pack_row_lengths. mT5: prompts in encoder
    # rows of pack_row_lengths, the same pairs' targets in decoder rows of
    # pack_target_row_lengths. False: the padded buckets below.
    cfg.packing = True
    cfg.pack_row_lengths = (128, 256)  # longer sequences get a row of their own length (multiple of 64)
    # mT5 only: a batch's decoder rows take the smallest of these that holds its
    # fullest row; the largest caps the target tokens of one row's pairs.
    cfg.pack_target_row_lengths = (16, 32, 48, 64, 80, 96, 128)
    cfg.pack_max_segments = 16  # pairs per row
    cfg.target_slot_multiple = 64  # flat target slots per device are padded to a multiple of this
    cfg.input_buckets = (64, 96, 128, 160, 192, 256, 320, 384, 512)
    cfg.target_buckets = (8, 16, 24, 32, 48, 64, 96, 128)
    # Rows x length per batch: 4,096 is fastest on a 2-core CPU in bfloat16
    # (2,048 in float32; bench/score.py); accelerators want 16k and more.
    cfg.tokens_per_batch = 4096
    # mT5: each stack's blocks as one lax.scan (models.layers.run_blocks), compiled once instead of once
    # per layer; bench/compile.py measures the compile time it saves. (Gemma's loop is not scanned.)
    cfg.scan_layers = False
    cfg.vocab_chunk = 16384  # LM-head columns per log-sum-exp step; 0 = whole vocabulary at once
    # checkpoint='random': a randomly initialised Gemma 3 of this shape (tests,
    # configs/tiny.py) with the tokenizer above ('' = the packaged GGUF's).
    cfg.random = ml_collections.ConfigDict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                                sliding_window=64))
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Checks the choices before any weights are read."""
    for key, value, allowed in (("model", cfg.model, ("gemma3", "mt5")), ("reduction", cfg.reduction, REDUCTIONS),
                                ("truncation", cfg.truncation, TRUNCATIONS)):
        if value not in allowed:
            raise ValueError(f"teacher.{key}={value!r}; choose one of {allowed}")
    for field in ("{text}", "{language}"):
        if field not in cfg.input_template:
            raise ValueError(f"teacher.input_template {cfg.input_template!r} lacks the field {field}")
    if "{query}" not in cfg.target_template:
        raise ValueError(f"teacher.target_template {cfg.target_template!r} lacks the field {{query}}")
    for key in ("pack_row_lengths", "pack_target_row_lengths")[:2 if cfg.model == "mt5" else 1]:
        lengths = tuple(cfg.get(key, ()) or ())
        if cfg.packing and (not lengths or any(int(x) < 1 for x in lengths)):
            raise ValueError(f"teacher.{key}={lengths!r}: packing needs one or more positive row lengths")
    if cfg.packing and int(cfg.pack_max_segments) < 1:
        raise ValueError(f"teacher.pack_max_segments={cfg.pack_max_segments} must be at least 1")
    if cfg.max_input_length < 8 or cfg.max_target_length < 2:
        raise ValueError(f"teacher.max_input_length={cfg.max_input_length} / max_target_length="
                         f"{cfg.max_target_length} are too small to hold a prompt and a question")


# ----------------------------------------------------------------------------- prompting


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids per pair: the prompt (model input or prefix) and the scored target."""

    inputs: list[list[int]]
    targets: list[list[int]]
    truncated: int  # prompts that were cut to max_input_length


def _check_lengths(queries: Sequence[Any], passages: Sequence[Any], languages: Sequence[Any]) -> None:
    if not len(queries) == len(passages) == len(languages):
        raise ValueError(f"score() needs one passage and one language per query: got {len(queries)} queries, "
                         f"{len(passages)} passages, {len(languages)} languages")


def _split_passage(passage: Any, index: int) -> tuple[str, str]:
    """A passage is its text, a (title, text) pair, or a mapping with 'title'/'text'."""
    if isinstance(passage, str):
        title, text = "", passage
    elif isinstance(passage, dict):
        title, text = passage.get("title", "") or "", passage.get("text", "")
    elif isinstance(passage, (tuple, list)) and len(passage) == 2:
        title, text = passage
    else:
        raise TypeError(f"passage {index}: expected a string, a (title, text) pair or a dict, got {type(passage)}")
    if not isinstance(text, str) or not isinstance(title, str):
        raise TypeError(f"passage {index}: title and text must be strings")
    if not text.strip() and not title.strip():
        raise ValueError(f"passage {index} is empty (no title, no text)")
    return title.strip(), text.strip()


class Prompter:
    """(query, passage, language) -> the prompt and target token ids the teacher scores.

    Everything that decides what the LM reads is here, apart from the weights,
    so that prompts can be checked and changed without a model. The two
    families differ only in the special tokens around the sequences.
    """

    def __init__(self, tokenizer: Any, cfg: ml_collections.ConfigDict, encoder_decoder: bool):
        self.tokenizer, self.cfg, self.encoder_decoder = tokenizer, cfg, encoder_decoder

    def language_of(self, code: str, index: int) -> str:
        """English name for the prompt; the error names the pair."""
        try:
            return language_name(code)
        except ValueError:
            if self.cfg.unknown_language_name:
                return self.cfg.unknown_language_name
            raise ValueError(f"pair {index}: unknown language code {code!r}; supported: "
                             f"{', '.join(sorted(LANGUAGE_NAMES))} (or set teacher.unknown_language_name)") from None

    def prompt(self, title: str, text: str, language: str) -> str:
        template = self.cfg.input_template
        if not title:  # "Passage: {title} {text}" without a title: no double space
            template = template.replace("{title} ", "").replace("{title}", "")
        return template.format(title=title, text=text, language=language)

    def target(self, query: str) -> str:
        return self.cfg.target_template.format(query=query)

    def tokenize(self, queries: Sequence[str], passages: Sequence[Any], languages: Sequence[str]) -> TokenizedPairs:
        """Prompt and target token ids per pair, validated and truncated per config."""
        _check_lengths(queries, passages, languages)
        prompts, targets = [], []
        for i, (query, passage, lang) in enumerate(zip(queries, passages, languages, strict=True)):
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"query {i} is empty")
            title, text = _split_passage(passage, i)
            prompts.append(self.prompt(title, text, self.language_of(lang, i)))
            targets.append(self.target(query.strip()))
        max_in = int(self.cfg.max_input_length)
        input_ids = self._prompt_ids(prompts)
        truncated = 0
        for i, ids in enumerate(input_ids):
            if len(ids) > max_in:
                truncated += 1
                input_ids[i] = self._truncate(ids, passages[i], languages[i], i, max_in)
        if truncated:
            logging.info("teacher: %d of %d prompts longer than %d tokens were truncated (%s)", truncated,
                         len(prompts), max_in, self.cfg.truncation)
        return TokenizedPairs(list(input_ids), list(self._target_ids(targets)), truncated)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Untruncated prompt ids: the tokenizer's specials (mT5: a final </s>), or BOS + prompt.

        Decoder-only prompts get BOS (if the tokenizer has one) and nothing
        else, whatever the tokenizer's post-processor would append, since the
        target continues the same sequence.
        """
        if self.encoder_decoder:
            return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return [bos + x for x in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]

    def _target_ids(self, targets: list[str]) -> list[list[int]]:
        """Target ids, at most max_target_length: mT5 ends them with </s>, decoder-only with EOS if configured."""
        tok, max_out = self.tokenizer, int(self.cfg.max_target_length)
        if self.encoder_decoder:
            # As the official code: the tokenizer appends </s> to the target.
            return tok(targets, add_special_tokens=True, truncation=True, max_length=max_out)["input_ids"]
        target_ids = tok([self.cfg.separator + t for t in targets], add_special_tokens=False)["input_ids"]
        if self.cfg.target_eos:
            target_ids = [[*t[:max_out - 1], tok.eos_token_id] for t in target_ids]
        return [t[:max_out] for t in target_ids]

    def _truncate(self, ids: list[int], passage: Any, language: str, index: int, max_len: int) -> list[int]:
        specials = set(self.tokenizer.all_special_ids)
        ends_special = ids[-1] in specials and self.encoder_decoder
        if self.cfg.truncation == "input":
            # Official behaviour: keep the first tokens (and the final </s>).
            return [*ids[:max_len - 1], ids[-1]] if ends_special else ids[:max_len]
        # 'passage': shorten the passage text until the whole prompt fits, so
        # the instruction at the end survives. Cut by the overflow in tokens,
        # measured again after each cut (tokenization is not additive).
        title, text = _split_passage(passage, index)
        name = self.language_of(language, index)
        for _ in range(8):
            overflow = len(ids) - max_len
            if overflow <= 0:
                return ids
            text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            keep = max(0, len(text_ids) - overflow - 1)
            text = self.tokenizer.decode(text_ids[:keep]).strip()
            ids = self._prompt_ids([self.prompt(title, text, name)])[0]
        return [*ids[:max_len - 1], ids[-1]] if ends_special else ids[:max_len]


# ----------------------------------------------------------------------------- batch layouts
#
# One class per way of laying pairs out on the device, each with the same four
# methods: plan (pairs -> batches), arrays (a batch -> host arrays), forward
# (the traced model call on those arrays) and results (device output -> per-pair
# sums of target log-probs and target counts). The scoring loop in Teacher is
# the same for all four: encoder-decoder padded (EncoderDecoderRows) or packed
# (PackedEncoderDecoderRows), decoder-only padded (DecoderRows) or packed
# (PackedRows).


def _lengths(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    return np.array([len(s) for s in sequences], np.int64)


def _pair_groups(cfg: ml_collections.ConfigDict, input_lengths: np.ndarray, target_lengths: np.ndarray,
                 input_cap: int, devices: int) -> list[PairGroup]:
    """The configured buckets, capped at the longest possible input (itself always a bucket), so nothing overflows."""
    max_out = int(cfg.max_target_length)
    in_buckets = sorted({min(int(x), input_cap) for x in cfg.input_buckets} | {input_cap})
    out_buckets = sorted({min(int(x), max_out) for x in cfg.target_buckets} | {max_out})
    return plan_pair_groups(input_lengths, target_lengths, in_buckets, out_buckets, int(cfg.tokens_per_batch),
                            devices)


def _row_sums(model: nnx.Module, hidden: jax.Array, labels: jax.Array, label_mask: jax.Array,
              vocab_chunk: int) -> tuple[jax.Array, jax.Array]:
    """Per row: the sum of its target tokens' log-probs and their count."""
    logp = target_log_probs(model, hidden, labels, vocab_chunk)
    weights = label_mask.astype(jnp.float32)
    return (logp * weights).sum(-1), weights.sum(-1)


def _row_results(group: PairGroup, output: tuple[jax.Array, jax.Array]) -> tuple[np.ndarray, ...]:
    """Filler rows (-1) are dropped: their padding-only outputs mean nothing."""
    total, count = (np.asarray(x, np.float64) for x in output)
    keep = group.rows >= 0
    return group.rows[keep], total[keep], count[keep]


class EncoderDecoderRows:
    """mT5: one pair per row, the prompt padded as encoder input, the target as decoder labels."""

    output_ranks = (1, 1)

    def __init__(self, cfg: ml_collections.ConfigDict, pad_id: int, devices: int, decoder_start: int):
        self.cfg, self.pad_id, self.devices, self.decoder_start = cfg, pad_id, devices, decoder_start

    def plan(self, pairs: TokenizedPairs) -> list[PairGroup]:
        return _pair_groups(self.cfg, _lengths(pairs.inputs), _lengths(pairs.targets), int(self.cfg.max_input_length),
                            self.devices)

    def arrays(self, pairs: TokenizedPairs, group: PairGroup) -> tuple[np.ndarray, ...]:
        size, take = len(group.rows), group.rows[group.rows >= 0]
        targets = [pairs.targets[i] for i in take]
        ids, mask = pad_rows([pairs.inputs[i] for i in take], size, group.input_length, self.pad_id)
        # Teacher forcing: the decoder reads the start token, then the target shifted right.
        decoder_ids, decoder_mask = pad_rows([[self.decoder_start, *y[:-1]] for y in targets], size,
                                             group.target_length, self.pad_id)
        labels, label_mask = pad_rows(targets, size, group.target_length, 0)
        return ids, mask, decoder_ids, decoder_mask, labels, label_mask

    @staticmethod
    def forward(model: nnx.Module, arrays: tuple[jax.Array, ...], vocab_chunk: int) -> tuple[jax.Array, jax.Array]:
        ids, mask, decoder_ids, decoder_mask, labels, label_mask = arrays
        hidden = model.decode(model.encode(ids, mask), mask, decoder_ids, decoder_mask)
        return _row_sums(model, hidden, labels, label_mask, vocab_chunk)

    results = staticmethod(_row_results)


class DecoderRows:
    """Decoder-only, one pair per row: prompt then target in one padded sequence (`packing=False`)."""

    output_ranks = (1, 1)

    def __init__(self, cfg: ml_collections.ConfigDict, pad_id: int, devices: int):
        self.cfg, self.pad_id, self.devices = cfg, pad_id, devices

    def plan(self, pairs: TokenizedPairs) -> list[PairGroup]:
        targets = _lengths(pairs.targets)
        cap = int(self.cfg.max_input_length) + int(self.cfg.max_target_length)  # one sequence holds both
        return _pair_groups(self.cfg, _lengths(pairs.inputs) + targets, targets, cap, self.devices)

    def arrays(self, pairs: TokenizedPairs, group: PairGroup) -> tuple[np.ndarray, ...]:
        size, take = len(group.rows), group.rows[group.rows >= 0]
        xs, ys = [pairs.inputs[i] for i in take], [pairs.targets[i] for i in take]
        ids, mask = pad_rows([x + y for x, y in zip(xs, ys, strict=True)], size, group.input_length, self.pad_id)
        # Target token j is predicted by the hidden state at position len(prompt) + j - 1.
        positions, _ = pad_rows([np.arange(len(x) - 1, len(x) + len(y) - 1) for x, y in zip(xs, ys, strict=True)],
                                size, group.target_length, 0)
        labels, label_mask = pad_rows(ys, size, group.target_length, 0)
        return ids, mask, positions, labels, label_mask

    @staticmethod
    def forward(model: nnx.Module, arrays: tuple[jax.Array, ...], vocab_chunk: int) -> tuple[jax.Array, jax.Array]:
        ids, mask, positions, labels, label_mask = arrays
        hidden = jnp.take_along_axis(model.hidden_states(ids, mask), positions[..., None], axis=1)
        return _row_sums(model, hidden, labels, label_mask, vocab_chunk)

    results = staticmethod(_row_results)


def _flat_slots(slots: list[list[tuple[int, int, int, int]]],
                multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per device, (local row, position, label, pair) of each target token -> four (devices, slots) arrays.

    Every device's list is padded to one width, a multiple of `multiple`, with
    slots (row 0, position 0, label 0, pair -1) whose outputs are dropped.
    """
    width = max(multiple, -(-max(len(s) for s in slots) // multiple) * multiple)
    flat = np.zeros((4, len(slots), width), np.int64)
    flat[3] = -1
    for d, entries in enumerate(slots):
        if entries:
            flat[:, d, :len(entries)] = np.array(entries, np.int64).T
    return flat[0].astype(np.int32), flat[1].astype(np.int32), flat[2].astype(np.int32), flat[3]


def _pick_targets(hidden: jax.Array, flat_rows: jax.Array, flat_positions: jax.Array) -> jax.Array:
    """Rows (devices x rows per device, length, hidden) -> the states at each device's flat slots."""
    # (devices, rows per device, length, hidden): each device gathers its own rows' targets.
    hidden = hidden.reshape(flat_rows.shape[0], -1, *hidden.shape[1:])
    return jax.vmap(lambda h, r, p: h[r, p])(hidden, flat_rows, flat_positions)


def _flat_results(flat_pairs: np.ndarray, output: jax.Array) -> tuple[np.ndarray, ...]:
    """One entry per target token (a pair's tokens are summed by the caller); padding slots are dropped."""
    real = flat_pairs >= 0
    return flat_pairs[real], np.asarray(output, np.float64)[real], np.ones(int(real.sum()))


@dataclasses.dataclass(frozen=True)
class PackedPairBatch:
    """Decoder-only pairs packed into rows, and their target positions as flat per-device lists.

    Rows split evenly over the `data` devices; `flat_*[d]` list the target
    tokens of device d's rows (row indices local to that device), padded to a
    common length with weight-0 slots whose pair is -1.
    """

    ids: np.ndarray  # (rows, length)
    segments: np.ndarray  # (rows, length) 1.. per sequence, 0 = padding
    positions: np.ndarray  # (rows, length) restarting at 0 per sequence
    flat_rows: np.ndarray  # (devices, slots) local row of each target token
    flat_positions: np.ndarray  # (devices, slots) position predicting it
    flat_labels: np.ndarray  # (devices, slots) the target token
    flat_pairs: np.ndarray  # (devices, slots) pair index, -1 = padding slot (host only)


class PackedRows:
    """Decoder-only, several (prompt + target) sequences per row (`packing=True`, the default).

    Block-diagonal causal attention with positions restarting per sequence, and
    the LM head on a flat list of exactly the target positions.
    """

    output_ranks = 2

    def __init__(self, cfg: ml_collections.ConfigDict, pad_id: int, devices: int):
        self.cfg, self.pad_id, self.devices = cfg, pad_id, devices

    def plan(self, pairs: TokenizedPairs) -> list[PackedPairBatch]:
        """Packed rows (best-fit, longest first) cut into batches of one shape per row length."""
        sequences = [x + y for x, y in zip(pairs.inputs, pairs.targets, strict=True)]
        longest = max((len(s) for s in sequences), default=0)
        row_lengths = sorted({int(r) for r in self.cfg.pack_row_lengths})
        if longest > row_lengths[-1]:
            row_lengths.append(-(-longest // 64) * 64)
        batches = plan_packed(sequences, row_lengths, int(self.cfg.tokens_per_batch), int(self.cfg.pack_max_segments),
                              self.pad_id, self.devices)
        return [self._with_target_slots(pairs, batch) for batch in batches]

    def _with_target_slots(self, pairs: TokenizedPairs, batch: PackedBatch) -> PackedPairBatch:
        """Each device gets the (local row, position, label, pair) of its rows' target tokens, padded to one width."""
        per_device = len(batch.ids) // self.devices
        slots: list[list[tuple[int, int, int, int]]] = [[] for _ in range(self.devices)]
        for r, members in enumerate(batch.rows):
            offset = 0
            for i in members[members >= 0]:
                x, y = pairs.inputs[i], pairs.targets[i]
                # Target token j sits at offset + len(x) + j; the state before it predicts it.
                start = offset + len(x) - 1
                slots[r // per_device].extend((r % per_device, start + j, t, i) for j, t in enumerate(y))
                offset += len(x) + len(y)
        return PackedPairBatch(batch.ids, batch.segments, batch.positions,
                               *_flat_slots(slots, int(self.cfg.target_slot_multiple)))

    @staticmethod
    def arrays(pairs: TokenizedPairs, batch: PackedPairBatch) -> tuple[np.ndarray, ...]:
        return batch.ids, batch.segments, batch.positions, batch.flat_rows, batch.flat_positions, batch.flat_labels

    @staticmethod
    def forward(model: nnx.Module, arrays: tuple[jax.Array, ...], vocab_chunk: int) -> jax.Array:
        """Target log-prob per flat slot, (devices, slots)."""
        ids, segments, positions, flat_rows, flat_positions, flat_labels = arrays
        hidden = model.hidden_states(ids, None, segments=segments, positions=positions)
        return target_log_probs(model, _pick_targets(hidden, flat_rows, flat_positions), flat_labels, vocab_chunk)

    @staticmethod
    def results(batch: PackedPairBatch, output: jax.Array) -> tuple[np.ndarray, ...]:
        return _flat_results(batch.flat_pairs, output)


@dataclasses.dataclass(frozen=True)
class PackedEncoderDecoderBatch:
    """mT5 pairs packed into rows: prompts in encoder rows, their targets in decoder rows, same order.

    Segment s of encoder row r and segment s of decoder row r are one pair's
    prompt and target; rows split evenly over the `data` devices and the flat
    slots list each device's target tokens as in :class:`PackedPairBatch`.
    """

    ids: np.ndarray  # (rows, input row length)
    segments: np.ndarray  # (rows, input row length) 1.. per prompt, 0 = padding
    positions: np.ndarray  # (rows, input row length) restarting at 0 per prompt
    decoder_ids: np.ndarray  # (rows, target row length): per target, the start token then the target shifted right
    decoder_segments: np.ndarray  # (rows, target row length) the prompt's segment number
    decoder_positions: np.ndarray  # (rows, target row length) restarting at 0 per target
    flat_rows: np.ndarray  # (devices, slots) local row of each target token
    flat_positions: np.ndarray  # (devices, slots) its decoder position (which predicts it)
    flat_labels: np.ndarray  # (devices, slots) the target token
    flat_pairs: np.ndarray  # (devices, slots) pair index, -1 = padding slot (host only)


class PackedEncoderDecoderRows:
    """mT5, several pairs per row (`packing=True`, the default): prompts packed into encoder rows of
    `pack_row_lengths`, their targets into decoder rows of `pack_target_row_lengths`.

    Encoder self-attention sees only the own prompt, decoder self-attention is
    causal within the own target, cross-attention reads only the own pair's
    prompt, and relative positions restart per sequence, so every pair is
    scored as alone. The LM head runs on a flat list of exactly the target
    tokens. Each batch's decoder rows take the smallest configured length that
    holds its fullest row (rows of one input length are sorted by target
    tokens before being cut into batches, so that length stays tight).
    """

    output_ranks = 2

    def __init__(self, cfg: ml_collections.ConfigDict, pad_id: int, devices: int, decoder_start: int):
        self.cfg, self.pad_id, self.devices, self.decoder_start = cfg, pad_id, devices, decoder_start

    @staticmethod
    def _lengths_for(configured: Sequence[int], longest: int) -> list[int]:
        """The configured row lengths, plus one of the longest sequence (rounded up to 64) if none holds it."""
        lengths = sorted({int(r) for r in configured})
        if longest > lengths[-1]:
            lengths.append(-(-longest // 64) * 64)
        return lengths

    def plan(self, pairs: TokenizedPairs) -> list[PackedEncoderDecoderBatch]:
        inputs, targets = _lengths(pairs.inputs), _lengths(pairs.targets)
        if not len(inputs):
            return []
        row_lengths = self._lengths_for(self.cfg.pack_row_lengths, int(inputs.max()))
        target_row_lengths = self._lengths_for(self.cfg.pack_target_row_lengths, int(targets.max()))
        max_segments = int(self.cfg.pack_max_segments)
        packed = pack_pair_rows(inputs, targets, row_lengths, target_row_lengths[-1], max_segments)
        # Teacher forcing: each target's decoder input is the start token, then the target shifted right.
        shifted = [[self.decoder_start, *y[:-1]] for y in pairs.targets]
        batches = []
        for row_length in sorted({size for size, _ in packed}):
            rows = [members for size, members in packed if size == row_length]
            rows.sort(key=lambda members: int(targets[members].sum()))  # stable: the plan is deterministic
            for chunk, size in chunk_rows(rows, row_length, int(self.cfg.tokens_per_batch), self.devices):
                fill = max(int(targets[members].sum()) for members in chunk)
                # Device d takes rows d, d + devices, ...: each gets a share of the target tokens of every
                # fill, so the flat slot lists (padded to the longest of them) stay even.
                per_device = size // self.devices
                chunk = [row for d in range(self.devices)
                         for row in [*chunk[d::self.devices], *[[]] * (per_device - len(chunk[d::self.devices]))]]
                encoder = fill_packed(pairs.inputs, chunk, size, row_length, max_segments, self.pad_id)
                decoder = fill_packed(shifted, chunk, size, bucket_for(fill, target_row_lengths), max_segments,
                                      self.pad_id)
                batches.append(self._batch(pairs, chunk, size, encoder, decoder))
        return batches

    def _batch(self, pairs: TokenizedPairs, rows: list[list[int]], size: int, encoder: PackedBatch,
               decoder: PackedBatch) -> PackedEncoderDecoderBatch:
        """Each device gets the (local row, decoder position, label, pair) of its rows' target tokens."""
        per_device = size // self.devices
        slots: list[list[tuple[int, int, int, int]]] = [[] for _ in range(self.devices)]
        for r, members in enumerate(rows):
            offset = 0
            for i in members:
                # Decoder position offset + j reads the token before target token j and predicts it.
                target = pairs.targets[i]
                slots[r // per_device].extend((r % per_device, offset + j, t, i) for j, t in enumerate(target))
                offset += len(target)
        return PackedEncoderDecoderBatch(encoder.ids, encoder.segments, encoder.positions, decoder.ids,
                                         decoder.segments, decoder.positions,
                                         *_flat_slots(slots, int(self.cfg.target_slot_multiple)))

    @staticmethod
    def arrays(pairs: TokenizedPairs, batch: PackedEncoderDecoderBatch) -> tuple[np.ndarray, ...]:
        return (batch.ids, batch.segments, batch.positions, batch.decoder_ids, batch.decoder_segments,
                batch.decoder_positions, batch.flat_rows, batch.flat_positions, batch.flat_labels)

    @staticmethod
    def forward(model: nnx.Module, arrays: tuple[jax.Array, ...], vocab_chunk: int) -> jax.Array:
        """Target log-prob per flat slot, (devices, slots)."""
        (ids, segments, positions, decoder_ids, decoder_segments, decoder_positions, flat_rows, flat_positions,
         flat_labels) = arrays
        encoded = model.encode(ids, None, segments=segments, positions=positions)
        hidden = model.decode(encoded, None, decoder_ids, None, encoder_segments=segments,
                              segments=decoder_segments, positions=decoder_positions)
        return target_log_probs(model, _pick_targets(hidden, flat_rows, flat_positions), flat_labels, vocab_chunk)

    @staticmethod
    def results(batch: PackedEncoderDecoderBatch, output: jax.Array) -> tuple[np.ndarray, ...]:
        return _flat_results(batch.flat_pairs, output)


# ----------------------------------------------------------------------------- scoring


def load_lm(cfg: ml_collections.ConfigDict, seed: int = 0, role: str = "teacher",
            mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES) -> tuple[nnx.Module, Any]:
    """The LM and tokenizer a `teacher`-style config section names (`model`, `checkpoint`, `tokenizer`,
    dtypes, `random`); the reader loads its generator the same way. With a mesh, checkpoint tensors load
    straight into their shards (a teacher larger than one chip loads on a `model`-sharded mesh)."""
    placement = sharding.placement(mesh, rules) if mesh is not None else None
    start = time.perf_counter()
    if cfg.checkpoint == "random":
        from umr_jax.models import gemma_weights
        from umr_jax.models.gemma import Gemma3Config

        if cfg.model != "gemma3":
            raise ValueError(f"{role}.checkpoint='random' builds a Gemma 3; set {role}.model='gemma3'")
        tokenizer = gemma_weights.load_tokenizer(cfg.tokenizer or gemma_weights.default_gguf_path())
        config = Gemma3Config(vocab_size=len(tokenizer), **cfg.random)
        model = gemma_weights.build_gemma(config, param_dtype=resolve_auto_dtype(cfg.param_dtype),
                                          dtype=resolve_auto_dtype(cfg.dtype), seed=seed)
        description = f"random Gemma 3 {dict(cfg.random)}"
    elif cfg.model == "mt5":
        from umr_jax.models.hf_checkpoint import load_tokenizer
        from umr_jax.models.t5_weights import build_mt5, load_hf_weights, load_t5_checkpoint

        ckpt = load_t5_checkpoint(cfg.checkpoint)
        model = build_mt5(ckpt.config, param_dtype=resolve_auto_dtype(cfg.param_dtype),
                          dtype=resolve_auto_dtype(cfg.dtype), seed=seed, random_init=False)
        load_hf_weights(model, ckpt.weights, ckpt.description, placement)
        tokenizer = load_tokenizer(cfg.tokenizer or ckpt.tokenizer_source)
        description = ckpt.description
    else:
        from umr_jax.models import gemma_weights

        ckpt = gemma_weights.load_gemma_checkpoint(cfg.checkpoint)
        model = gemma_weights.build_gemma(ckpt.config, param_dtype=resolve_auto_dtype(cfg.param_dtype),
                                          dtype=resolve_auto_dtype(cfg.dtype), seed=seed, random_init=False)
        gemma_weights.load_hf_weights(model, ckpt.weights, ckpt.description, placement)
        tokenizer = gemma_weights.load_tokenizer(cfg.tokenizer or ckpt.tokenizer_source)
        description = ckpt.description
    logging.info("%s: %s (%s) loaded in %.1fs", role, description, cfg.model, time.perf_counter() - start)
    return model, tokenizer


class Teacher:
    """Tokenizer + generative LM on a mesh; scores (query, passage) pairs."""

    def __init__(self, model: nnx.Module, tokenizer: Any, cfg: ml_collections.ConfigDict, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES):
        validate_config(cfg)
        self.model, self.tokenizer, self.cfg, self.mesh, self.rules = model, tokenizer, cfg, mesh, rules
        set_scan_layers(model, bool(cfg.get("scan_layers", False)))
        self.param_shardings = sharding.shard_module(model, mesh, rules)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encoder_decoder = cfg.model == "mt5"
        self.prompter = Prompter(tokenizer, cfg, encoder_decoder)
        devices = sharding.data_parallel_size(mesh, rules)
        self.layout: EncoderDecoderRows | PackedEncoderDecoderRows | DecoderRows | PackedRows
        if encoder_decoder and cfg.packing:
            self.layout = PackedEncoderDecoderRows(cfg, self.pad_id, devices, model.config.decoder_start_token_id)
        elif encoder_decoder:
            self.layout = EncoderDecoderRows(cfg, self.pad_id, devices, model.config.decoder_start_token_id)
        elif cfg.packing:
            self.layout = PackedRows(cfg, self.pad_id, devices)
        else:
            self.layout = DecoderRows(cfg, self.pad_id, devices)
        self._jitted: Any = None  # the layout's scoring program, compiled on first use

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, mesh: Mesh, rules=sharding.DEFAULT_RULES,
                    seed: int = 0) -> Teacher:
        validate_config(cfg)
        model, tokenizer = load_lm(cfg, seed, "teacher", mesh, rules)
        return cls(model, tokenizer, cfg, mesh, rules)

    def tokenize(self, queries: Sequence[str], passages: Sequence[Any], languages: Sequence[str]) -> TokenizedPairs:
        """See :meth:`Prompter.tokenize`; tokenizing once lets callers (bench/score.py) time scoring alone."""
        return self.prompter.tokenize(queries, passages, languages)

    def score(self, queries: Sequence[str], passages: Sequence[Any], languages: Sequence[str], *,
              progress: bool = True, desc: str = "teacher") -> np.ndarray:
        """log P(target | prompt) per pair, float32, in input order (mean or sum per config)."""
        _check_lengths(queries, passages, languages)
        if not len(queries):
            return np.zeros((0,), np.float32)
        return self.score_tokens(self.tokenize(queries, passages, languages), progress=progress, desc=desc)

    def score_tokens(self, pairs: TokenizedPairs, *, progress: bool = True, desc: str = "teacher") -> np.ndarray:
        """As :meth:`score`, from token ids: the layout's batches, dispatched ahead of their collection."""
        layout, program = self.layout, self._scoring_program()
        totals = np.zeros((len(pairs.inputs),), np.float64)
        counts = np.zeros((len(pairs.inputs),), np.float64)
        bar = tqdm(total=len(pairs.inputs), desc=desc, unit="pair", disable=not progress, smoothing=0.1)

        def collect(batch: Any, output: Any) -> None:
            index, logp, count = layout.results(batch, output)
            np.add.at(totals, index, logp)
            np.add.at(counts, index, count)
            bar.update(len(np.unique(index)))

        _, state = nnx.split(self.model)  # current weights
        start = time.perf_counter()
        try:
            dispatch_ahead(((batch, layout.arrays(pairs, batch)) for batch in layout.plan(pairs)),
                           lambda arrays: program(state, sharding.shard_batch(arrays, self.mesh, self.rules)),
                           collect)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        logging.info("teacher: scored %d pairs in %.1fs (%.1f pairs/s, %s)", len(totals), elapsed,
                     len(totals) / max(elapsed, 1e-9), type(layout).__name__)
        scores = totals / counts if self.cfg.reduction == "mean" else totals
        return scores.astype(np.float32)

    def _scoring_program(self) -> Any:
        """(weights, a batch's arrays) -> the layout's output, jitted once.

        Parameters are placed by their logical axes and batch rows split over
        `data`. The weights are an argument, not a closure constant, so one
        program serves whatever weights the model holds when scoring starts.
        """
        if self._jitted is None:
            graphdef, state = nnx.split(self.model)
            layout = self.layout
            # A vocabulary split over `model` is reduced by GSPMD across
            # devices; scanning over its chunks would gather it instead.
            chunk = int(self.cfg.vocab_chunk) if self.mesh.shape["model"] == 1 else 0

            def score(state, arrays):
                return layout.forward(nnx.merge(graphdef, state), arrays, chunk)

            def rows(ndim: int):
                return sharding.batch_sharding(self.mesh, ndim, self.rules)

            param_sharding = sharding.state_shardings(state, self.mesh, self.rules)
            self._jitted = jax.jit(score, in_shardings=(param_sharding, rows(2)),
                                   out_shardings=jax.tree.map(rows, layout.output_ranks))
        return self._jitted


def chunk_size(vocab: int, target: int) -> int:
    """The largest divisor of `vocab` in [target / 2, target], else `target` (the head gets padded).

    Reshaping the head into equal chunks is free; padding it copies the whole
    matrix on every call. 262,144 (Gemma) and 250,112 (mT5) both have divisors
    close to any power-of-two target.
    """
    for size in range(min(target, vocab), max(1, target // 2) - 1, -1):
        if vocab % size == 0:
            return size
    return target


def target_log_probs(model: nnx.Module, hidden: jax.Array, labels: jax.Array, vocab_chunk: int) -> jax.Array:
    """log softmax(logits)[label] at every given position, float32, shape of `labels`.

    With `vocab_chunk` > 0 the log-sum-exp runs over vocabulary slices of the
    LM head inside a scan (an online max / sum-of-exponentials), and the
    label's logit is one dot product with its own head row; peak memory is then
    tokens x chunk instead of tokens x vocab (262k for Gemma). 0 computes the
    full logits at once (what a model-sharded vocabulary wants).

    The slices follow the head's storage: row blocks of a (vocab, hidden) head
    (Gemma's tied embedding), or column blocks of a (hidden, vocab) kernel when
    the model offers one (``head_kernel()``: mT5's lm_head), read in place
    instead of through a transposed copy of the whole head on every call.
    """
    if vocab_chunk <= 0:
        logits = model.logits(hidden)
        picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)
    kernel = model.head_kernel() if hasattr(model, "head_kernel") else None  # (hidden, vocab) or None
    head = model.head_weight() if kernel is None else None  # (vocab, hidden); compute dtype either way
    width, vocab = kernel.shape if kernel is not None else head.shape[::-1]
    softcap = model.logit_softcap
    flat = hidden.reshape(-1, width).astype(head.dtype if kernel is None else kernel.dtype)

    def finish(z: jax.Array) -> jax.Array:
        return softcap * jnp.tanh(z / softcap) if softcap else z

    label_rows = (jnp.take(head, labels.reshape(-1), axis=0) if kernel is None
                  else jnp.take(kernel, labels.reshape(-1), axis=1).T)
    picked = finish(jnp.einsum("nh,nh->n", flat, label_rows, preferred_element_type=jnp.float32))
    vocab_chunk = chunk_size(vocab, vocab_chunk)
    chunks = -(-vocab // vocab_chunk)
    padding = chunks * vocab_chunk - vocab  # a copy of the head: only when no divisor is near the target
    valid = (jnp.arange(chunks * vocab_chunk) < vocab).reshape(chunks, vocab_chunk)
    if kernel is None:
        blocks = jnp.pad(head, ((0, padding), (0, 0))) if padding else head
        blocks = blocks.reshape(chunks, vocab_chunk, width)

        def chunk_logits(rows: jax.Array) -> jax.Array:
            return jnp.einsum("nh,vh->nv", flat, rows, preferred_element_type=jnp.float32)
    else:
        columns = jnp.pad(kernel, ((0, 0), (0, padding))) if padding else kernel
        blocks = jnp.arange(chunks)

        def chunk_logits(i: jax.Array) -> jax.Array:
            block = jax.lax.dynamic_slice_in_dim(columns, i * vocab_chunk, vocab_chunk, axis=1)
            return jnp.einsum("nh,hv->nv", flat, block, preferred_element_type=jnp.float32)

    def step(carry, chunk):
        running_max, running_sum = carry
        block, ok = chunk
        z = jnp.where(ok[None], finish(chunk_logits(block)), -jnp.inf)
        new_max = jnp.maximum(running_max, z.max(-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.exp(z - new_max[:, None]).sum(-1)
        return (new_max, running_sum), None

    init = (jnp.full((flat.shape[0],), -jnp.inf, jnp.float32), jnp.zeros((flat.shape[0],), jnp.float32))
    (maximum, total), _ = jax.lax.scan(step, init, (blocks, valid))
    return (picked - (maximum + jnp.log(total))).reshape(labels.shape)
