"""Paper-scale cost model: UMR as configs/xor.py runs it, on a Cloud TPU v4-32 and on 8 x H100.

    python bench/cost_model.py [--json_out=/tmp/cost.json] [--utilisation_override=0.4]
                               [--measured=bench/measured.json] [--passages=18000000]

Why: nobody here has run the paper's setup (18M passages, mContriever, mT5-XL)
-- our machines are 2-core CPUs. Before renting a pod slice a user wants to
know how long it takes, which stage dominates, whether each stage fits in a
chip's memory with the `(data, model)` mesh of configs/xor.py, and how big the
embeddings and the index get. This script answers with arithmetic that anyone
can check: FLOPs from the model shapes and token counts, memory from parameter
and activation sizes, wall time = FLOPs / (chips x peak x utilisation).

Where the numbers come from:
  * model shapes: mContriever = BERT-base multilingual cased (transformers'
    `BertConfig` defaults: hidden 768, 12 layers, 12 heads, FFN 3072, 512
    positions, 2 token types; mBERT vocabulary 119,547); teacher mT5-XL
    (d_model 2048, d_ff 5120 gated-GELU, 24 + 24 layers, 32 heads x 64,
    vocabulary 250,112, untied LM head);
  * workload: configs/xor.py and docs/algorithm.md (2 rounds, k = 100,
    15,250 training and 2,110 dev queries, B = 16 x n = 16, 10 epochs, bucket
    and batch sizes), the index defaults of `umr_jax/index.py`;
  * utilisation: the model-FLOP utilisation (MFU) that our code reached on a
    CPU, from bench/measured.json (copied from docs/benchmarks.md). A CPU
    MFU is only a proxy for what XLA reaches on a TPU or GPU: it says how much
    of the run is matmul work the compiler keeps busy, not how a systolic
    array or tensor cores behave. Stages never measured (training) use a named
    assumption, printed as such. `--utilisation_override` replaces them all.
Every other input is a named assumption in `ASSUMPTIONS`, printed with its
reason. The last line is `paper_scale_hours_tpu_v4_32: X` (total wall hours of
the whole run on the v4-32 at the default utilisation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
GB = 1e9
GIB = 2 ** 30


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A BERT-family encoder (no pooler: UMR mean-pools, and our towers carry none)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_positions: int = 512
    type_vocab: int = 2

    def embedding_params(self) -> int:
        return (self.vocab + self.max_positions + self.type_vocab) * self.hidden + 2 * self.hidden

    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn
        return 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h  # attention, FFN, two layer norms

    def params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params()

    def forward_flops(self, seq_len: float, num_seqs: float = 1.0) -> float:
        """Matmul FLOPs of a forward pass over `num_seqs` texts of `seq_len` tokens.

        The convention of bench/encode.py (`model_flops`), which produced the
        measured MFU this model scales: per layer 2 n (4 h^2 + 2 h f) for the
        projections and FFN plus 4 n^2 h for QK^T and AV. Embedding lookups,
        biases, norms and softmax are not matmuls and are left out.
        """
        h, f, n = self.hidden, self.ffn, seq_len
        return num_seqs * self.layers * (2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h)


@dataclasses.dataclass(frozen=True)
class T5:
    """A T5 v1.1 / mT5 encoder-decoder: gated-GELU FFN, RMS norm, relative position buckets, untied head."""

    vocab: int
    d_model: int
    d_ff: int
    enc_layers: int
    dec_layers: int
    heads: int
    d_kv: int
    rel_buckets: int = 32

    @property
    def inner(self) -> int:
        return self.heads * self.d_kv

    def params(self) -> int:
        d, i, f = self.d_model, self.inner, self.d_ff
        enc = self.enc_layers * (4 * d * i + 3 * d * f + 2 * d)
        dec = self.dec_layers * (8 * d * i + 3 * d * f + 3 * d)
        return 2 * self.vocab * d + enc + dec + 2 * d + 2 * self.rel_buckets * self.heads

    def pair_flops(self, input_len: float, target_len: float) -> float:
        """Matmul FLOPs to score one (input, target) pair: the formula of bench/score.py (`t5_flops`).

        Encoder: projections, gated FFN, attention. Decoder: self-attention
        (causal), cross-attention (its K/V projections run over the encoder
        output), gated FFN; LM head at every target position.
        """
        h, i, f, s, t = self.d_model, self.inner, self.d_ff, input_len, target_len
        enc = self.enc_layers * (2 * s * (4 * h * i + 3 * h * f) + 4 * s * s * i)
        dec = self.dec_layers * (2 * t * (6 * h * i + 3 * h * f) + 4 * s * h * i + 2 * t * (t + 1) * i + 4 * t * s * i)
        return enc + dec + 2 * t * h * self.vocab


MBERT = Encoder(vocab=119_547, hidden=768, layers=12, heads=12, ffn=3072)  # bert-base-multilingual-cased = mContriever
MT5_XL = T5(vocab=250_112, d_model=2048, d_ff=5120, enc_layers=24, dec_layers=24, heads=32, d_kv=64)
E5_SMALL = Encoder(vocab=250_037, hidden=384, layers=12, heads=12, ffn=1536)  # multilingual-e5-small


# ----------------------------------------------------------------------------- accelerators


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    key: str  # for the headline line and the JSON
    chips: int
    peak_flops: float  # dense bf16 per chip
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s per chip
    host_vcpus: int  # one host: where ScaNN would build and search
    source: str


TPU_V4_32 = Platform("Cloud TPU v4-32", "tpu_v4_32", chips=16, peak_flops=275e12, hbm_bytes=32 * GIB,
                     hbm_bandwidth=1200e9, host_vcpus=240,
                     source="Cloud TPU v4 docs: 275 TFLOP/s bf16 and 32 GiB HBM2 at 1,200 GB/s per chip; "
                            "v4-32 = 32 TensorCores = 16 chips (one JAX device each) on 4 hosts; 240 vCPUs per "
                            "host (as we recall the VM shape; not verified here -- it only scales the ScaNN note)")
H100_8 = Platform("8 x H100 SXM 80 GB", "8xh100", chips=8, peak_flops=989e12, hbm_bytes=80 * GB,
                  hbm_bandwidth=3.35e12, host_vcpus=208,
                  source="NVIDIA H100 SXM: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s; one host "
                         "(e.g. GCP a3-highgpu-8g: 208 vCPUs)")
PLATFORMS = (TPU_V4_32, H100_8)


# ----------------------------------------------------------------------------- assumptions


@dataclasses.dataclass(frozen=True)
class Assumption:
    name: str
    value: float
    why: str


ASSUMPTIONS: dict[str, Assumption] = {a.name: a for a in [
    Assumption("passages", 18_000_000,
               "XOR-Retrieve's corpus enwiki_20190201_w100.tsv (100-word passages of the 2019-02-01 English "
               "Wikipedia in DPR's format, 13 GB) has ~18M passages (../shared/data/xor-tydi/SOURCE.md; the file "
               "itself is not available here to count); DPR's psgs_w100.tsv (2018-12-20 dump) has 21,015,324. "
               "Encode time and sizes scale linearly: --passages"),
    Assumption("passage_tokens", 150,
               "mean mBERT tokens of '{title} {text}' for a 100-word English passage: ~1.3 WordPiece tokens per "
               "English word (130) + title (~8) + [CLS]/[SEP] + numbers and names that split further; under the "
               "256-token max_passage_length, so truncation is rare"),
    Assumption("query_tokens", 20,
               "mean mBERT tokens of an XOR-Retrieve question: the XLM-R tokenizer (multilingual-e5's) gives 14.6 "
               "incl. 2 special tokens on the 15,250 training questions (measured here for this model); mBERT's "
               "WordPiece splits bn/te/ja/ko text finer"),
    Assumption("encode_packing_efficiency", 0.95,
               "share of real tokens in packed encode rows (docs/usage.md: 95% on XQuAD-R with packing=True)"),
    Assumption("train_passage_padded", 192,
               "training pads each batch's 256 passages to a bucket of configs/xor.py (128, 192, 256): the longest "
               "of 256 passages of ~150 tokens mostly lands in 192"),
    Assumption("train_query_padded", 64,
               "query buckets (32, 64): the longest of 16 questions often exceeds 32 mBERT tokens (XLM-R p95 is 23)"),
    Assumption("teacher_input_tokens", 170,
               "mT5 SentencePiece tokens of 'Passage: {title} {text}. Please write a question based on this "
               "passage in {Language}.' + EOS: passage ~150 (as mBERT on English) + instruction ~20"),
    Assumption("teacher_input_padded", 192, "mT5 input buckets (..., 160, 192, 256, ...): most prompts land in 192"),
    Assumption("teacher_target_tokens", 16,
               "'Question: {q}' + EOS: question ~12.6 XLM-R tokens without specials (measured, as above) + ~3"),
    Assumption("teacher_target_padded", 24,
               "mT5 target buckets (8, 16, 24, 32, ...): about half the targets exceed 16"),
    Assumption("model_axis", 4, "configs/xor.py mesh_shape = (-1, 4): 4-way `model`, the rest `data`"),
    Assumption("activation_bytes_const", 10,
               "activation memory per layer per token = h (10 + 24/t + 5 a s / (h t)) bytes with 16-bit "
               "activations and t-way tensor parallelism (Korthikanti et al. 2022, 'Reducing Activation "
               "Recomputation', eq. 2); inference keeps one layer's worth live"),
    Assumption("scale_float32_copies_in_index_stage", 2,
               "at the index stage's peak, bench/scale.py holds two float32 copies of the embeddings (the matrix read "
               "from the store and ScaNN's copy kept for reordering): its bytes a passage at 32 dimensions grow by "
               "2 x 4 bytes per extra dimension; ids (~75 bytes) and ScaNN's codes do not grow with it"),
    Assumption("scann_kmeans_iterations", 10, "k-means iterations of ScaNN's tree training (build FLOPs lower bound)"),
    Assumption("train_mfu_equals_encode_bf16_mfu", 1.0,
               "training MFU was never measured: assume the training step (forward + backward of the same BERT "
               "matmuls, bfloat16 compute) reaches the measured bfloat16 encode MFU"),
    Assumption("ann_host_is_encode_host", 1.0,
               "bench/ann.py's 2 cores are taken to be the AMX host of bench/encode.py, whose float32 matmul peak "
               "(312 GFLOP/s) turns our exact-search q/s into a utilisation (ann's CPU is not named)"),
    Assumption("adamw_update_passes", 7,
               "the AdamW update is memory-bound: it reads parameters, gradients and both moments and writes "
               "parameters and moments, 7 float32 passes over each device's parameters per step, at HBM bandwidth "
               "(gradient all-reduce and other collectives are not modelled)"),
    Assumption("scann_scales_with_work", 1.0,
               "ScaNN q/s per vCPU scales inversely with the work per query (centroid scan + AH scan of the searched "
               "leaves + float reorder) and linearly with vCPUs"),
]}


def assumption(name: str) -> float:
    return ASSUMPTIONS[name].value


# ----------------------------------------------------------------------------- the workload


@dataclasses.dataclass(frozen=True)
class Workload:
    """configs/xor.py and docs/algorithm.md, plus the token assumptions."""

    passages: int
    rounds: int = 2
    k: int = 100
    train_queries: int = 15_250
    rank_queries: int = 500  # configs/xor.py train.rank_queries: held out for checkpoint selection, not trained on
    rank_pool: int = 31  # each held-out query's teacher top-1 and train.rank_negatives = 30 candidates
    evals_per_epoch: int = 4
    dev_queries: int = 2_110
    queries_per_batch: int = 16
    passages_per_query: int = 16
    epochs: float = 10.0
    embed_dim: int = 768
    query_batch: int = 1024  # index.query_batch
    encode_tokens_per_batch: int = 65_536  # retriever.tokens_per_batch
    teacher_tokens_per_batch: int = 65_536  # teacher.tokens_per_batch
    passage_tokens: float = 150
    query_tokens: float = 20
    teacher_input: float = 170
    teacher_target: float = 16
    teacher_input_padded: float = 192
    teacher_target_padded: float = 24
    train_passage_padded: float = 192
    train_query_padded: float = 64
    packing_efficiency: float = 0.95

    @property
    def train_steps(self) -> int:
        """umr_jax/distill.py `steps_for`: ceil(epochs x (queries - held out) / B)."""
        return max(1, math.ceil(self.epochs * (self.train_queries - self.rank_queries) / self.queries_per_batch))

    @property
    def rank_evaluations(self) -> int:
        """Average-rank evaluations a round (distill.train): every ceil(steps per epoch / evals) steps, and the last."""
        every = max(1, math.ceil((self.train_queries - self.rank_queries) / self.queries_per_batch
                                 / self.evals_per_epoch))
        return self.train_steps // every + (self.train_steps % every != 0)

    @property
    def teacher_pairs(self) -> int:
        return self.train_queries * self.k

    @property
    def encodings(self) -> int:
        """Round 0 encodes with the initial retriever, and every round re-encodes with its new passage tower."""
        return self.rounds + 1


def default_workload(passages: int) -> Workload:
    a = assumption
    return Workload(passages=passages, passage_tokens=a("passage_tokens"), query_tokens=a("query_tokens"),
                    teacher_input=a("teacher_input_tokens"), teacher_target=a("teacher_target_tokens"),
                    teacher_input_padded=a("teacher_input_padded"),
                    teacher_target_padded=a("teacher_target_padded"),
                    train_passage_padded=a("train_passage_padded"), train_query_padded=a("train_query_padded"),
                    packing_efficiency=a("encode_packing_efficiency"))


# ----------------------------------------------------------------------------- FLOPs per stage


def train_step_flops(model: Encoder, w: Workload, padded: bool = True) -> float:
    """One distillation step: forward + backward (= 3 x forward) of both towers, plus the B x (B n) score matmul."""
    p_len = w.train_passage_padded if padded else w.passage_tokens
    q_len = w.train_query_padded if padded else w.query_tokens
    n_pass = w.queries_per_batch * w.passages_per_query
    forward = model.forward_flops(p_len, n_pass) + model.forward_flops(q_len, w.queries_per_batch)
    scores = 2 * w.queries_per_batch * n_pass * model.hidden
    return 3 * (forward + scores)


def stage_flops(model: Encoder, teacher: T5, w: Workload) -> dict[str, dict[str, float]]:
    """Model FLOPs (real tokens) and executed FLOPs (padding included) of one run of each stage."""
    queries = w.train_queries + w.dev_queries
    search = 2.0 * queries * w.passages * w.embed_dim
    return {
        "encode": {"model": model.forward_flops(w.passage_tokens, w.passages),
                   "executed": model.forward_flops(w.passage_tokens, w.passages) / w.packing_efficiency},
        "index": {"model": 0.0, "executed": 0.0},
        "search": {"model": model.forward_flops(w.query_tokens, queries) + search,
                   "executed": model.forward_flops(w.query_tokens, queries) / w.packing_efficiency + search},
        "teacher": {"model": w.teacher_pairs * teacher.pair_flops(w.teacher_input, w.teacher_target),
                    "executed": w.teacher_pairs * teacher.pair_flops(w.teacher_input_padded,
                                                                     w.teacher_target_padded)},
        "train": {"model": w.train_steps * train_step_flops(model, w, False) + rank_eval_flops(model, w, False),
                  "executed": w.train_steps * train_step_flops(model, w, True) + rank_eval_flops(model, w, True)},
    }


def rank_eval_flops(model: Encoder, w: Workload, padded: bool) -> float:
    """train.select='average_rank': each evaluation embeds the held-out queries and their pools' passages."""
    p_len = w.train_passage_padded if padded else w.passage_tokens
    q_len = w.train_query_padded if padded else w.query_tokens
    per_eval = model.forward_flops(q_len, w.rank_queries) + model.forward_flops(p_len, w.rank_queries * w.rank_pool)
    return w.rank_evaluations * per_eval


def runs_per_stage(w: Workload) -> dict[str, int]:
    return {"encode": w.encodings, "index": w.encodings, "search": w.encodings,
            "teacher": w.rounds, "train": w.rounds}


# ----------------------------------------------------------------------------- utilisation


def load_measured(path: str | pathlib.Path) -> dict[str, dict]:
    """bench/measured.json -> {name: figure}; fails naming the file and the missing figure."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --measured=path/to/measured.json")
    doc = json.loads(path.read_text("utf-8"))
    figures = {f["name"]: f for f in doc["figures"]}
    for f in figures.values():
        for key in ("value", "unit", "command", "date"):
            if key not in f:
                raise SystemExit(f"{path}: figure {f.get('name')!r} has no {key!r}")
    figures["_settings"] = doc.get("settings", {})
    return figures


REQUIRED = ("encode_bf16_mfu", "score_gemma_f32_mfu", "ann_1m_ours_exact_qps", "encode_f32_matmul_peak_gflops",
            "ann_1m_scann_qps", "encode_bf16_passages_per_s", "encode_bf16_gflops")


def flop_convention_check(measured: dict[str, dict]) -> dict[str, float]:
    """The measured encode GFLOP/s recomputed from passages/s with this file's FLOP formula.

    If the two disagree, the utilisation taken from measured.json would not
    mean the same thing here as in bench/encode.py.
    """
    setting = measured["_settings"].get("encode_setting", {"passages": 2000, "tokens": 91_859})
    mean_tokens = setting["tokens"] / setting["passages"]
    rate = measured["encode_bf16_passages_per_s"]["value"]
    return {"mean_tokens": mean_tokens, "model_gflops": E5_SMALL.forward_flops(mean_tokens, rate) / 1e9,
            "measured_gflops": measured["encode_bf16_gflops"]["value"]}


def utilisation(measured: dict[str, dict], override: float | None = None) -> dict[str, dict]:
    """Per-stage accelerator utilisation and its basis (a measured CPU MFU, derived, or an assumption)."""
    for name in REQUIRED:
        if name not in measured:
            raise SystemExit(f"measured figures: {name!r} missing (bench/measured.json)")
    enc = measured["encode_bf16_mfu"]["value"]
    teacher = measured["score_gemma_f32_mfu"]["value"]
    ann = measured["_settings"].get("ann_1m_exact_setting", {"vectors": 1_000_000, "dim": 384})
    exact_gflops = measured["ann_1m_ours_exact_qps"]["value"] * 2 * ann["vectors"] * ann["dim"] / 1e9
    search = exact_gflops / measured["encode_f32_matmul_peak_gflops"]["value"]
    out = {
        "encode": {"value": enc, "basis": "measured CPU MFU: multilingual-e5-small encode, bfloat16 "
                                          "(encode_bf16_mfu)"},
        "search": {"value": search, "basis": f"derived: ours exact at 1M x {ann['dim']} (ann_1m_ours_exact_qps) = "
                                             f"{exact_gflops:.0f} GFLOP/s over the float32 peak "
                                             "(encode_f32_matmul_peak_gflops); assumption ann_host_is_encode_host"},
        "teacher": {"value": teacher, "basis": "measured CPU MFU: Gemma-3-270M scoring, float32 (score_gemma_f32_mfu; "
                                              "no bf16 or mT5 MFU was measured)"},
        "train": {"value": enc * assumption("train_mfu_equals_encode_bf16_mfu"),
                  "basis": "ASSUMPTION train_mfu_equals_encode_bf16_mfu (training MFU not measured)"},
        "index": {"value": 0.0, "basis": "exact backend: no FLOPs (the embeddings are placed on the devices)"},
    }
    if override is not None:
        for stage, u in out.items():
            if stage != "index":
                u.update(value=override, basis=f"--utilisation_override={override}")
    return out


# ----------------------------------------------------------------------------- memory


def shard(count: float, dim: int, ways: int) -> float:
    """Elements per device of a tensor whose `dim` is split `ways` ways (replicated when it does not divide)."""
    return count / ways if ways > 1 and dim % ways == 0 else count


def encoder_params_per_device(m: Encoder, model_axis: int) -> float:
    """Parameters on one device: attention heads and FFN split over `model`, the vocabulary when it divides."""
    h, f = m.hidden, m.ffn
    matmuls = m.layers * (shard(4 * h * h, m.heads, model_axis) + shard(2 * h * f, f, model_axis))
    word = shard(m.vocab * h, m.vocab, model_axis)
    rest = m.params() - m.layers * (4 * h * h + 2 * h * f) - m.vocab * h
    return matmuls + word + rest


def t5_params_per_device(m: T5, model_axis: int) -> float:
    d, i, f = m.d_model, m.inner, m.d_ff
    attn = (4 * m.enc_layers + 8 * m.dec_layers) * d * i
    ffn = 3 * (m.enc_layers + m.dec_layers) * d * f
    vocab = 2 * m.vocab * d
    rest = m.params() - attn - ffn - vocab
    return shard(attn, m.heads, model_axis) + shard(ffn, f, model_axis) + shard(vocab, m.vocab, model_axis) + rest


def activation_bytes_per_token_layer(hidden: int, heads: int, seq_len: float, tp: int) -> float:
    """Korthikanti et al. 2022, eq. 2 (16-bit activations, t-way tensor parallel, no sequence parallelism)."""
    return hidden * (assumption("activation_bytes_const") + 24 / tp + 5 * heads * seq_len / (hidden * tp))


def adamw_bytes(params: float, bytes_per_value: int = 4) -> dict[str, float]:
    """AdamW in float32: parameters + first and second moments = 3 x the parameter bytes; gradients 1 x more."""
    p = params * bytes_per_value
    return {"params": p, "adam_moments": 2 * p, "params_and_adamw": 3 * p, "grads": p}


def memory_per_device(model: Encoder, teacher: T5, w: Workload, p: Platform, model_axis: int) -> dict[str, dict]:
    """Bytes per device of each stage: parameters, optimizer state, activations, batch, data."""
    data_axis = max(1, p.chips // model_axis)
    enc_params = encoder_params_per_device(model, model_axis)
    h = model.hidden
    out: dict[str, dict] = {}

    # encode: float32 parameters (retriever.param_dtype), bfloat16 compute, one layer live.
    tokens = w.encode_tokens_per_batch / data_axis
    out["encode"] = {
        "params": enc_params * 4, "adam": 0.0, "grads": 0.0,
        "activations": tokens * activation_bytes_per_token_layer(h, model.heads, 256, model_axis),
        "batch": tokens * 3 * 4,  # token ids, positions, segment ids (int32)
        "data": tokens / w.passage_tokens * h * 4}  # this batch's embeddings
    # index + search (exact backend, index.exact.dtype float32): the corpus rows of this device and the
    # (query_batch x rows) float32 score matrix that lax.top_k reads.
    rows = math.ceil(w.passages / p.chips)
    out["search"] = {
        "params": enc_params * 4, "adam": 0.0, "grads": 0.0,
        "activations": w.query_batch * rows * 4,
        "batch": w.query_batch * h * 4,
        "data": rows * w.embed_dim * 4}
    # teacher: bfloat16 parameters (configs/xor.py), mT5 sharded over `model`; one encoder layer live, the
    # encoder output kept for cross-attention, float32 logits (+ log-softmax) of the target positions with the
    # vocabulary split over `model`.
    rows_t = w.teacher_tokens_per_batch // w.teacher_input_padded / data_axis
    in_tokens = rows_t * w.teacher_input_padded
    tgt_tokens = rows_t * w.teacher_target_padded
    out["teacher"] = {
        "params": t5_params_per_device(teacher, model_axis) * 2, "adam": 0.0, "grads": 0.0,
        "activations": (in_tokens * activation_bytes_per_token_layer(teacher.d_model, teacher.heads,
                                                                     w.teacher_input_padded, model_axis)
                        + in_tokens * teacher.d_model * 2
                        + 2 * tgt_tokens * shard(teacher.vocab, teacher.vocab, model_axis) * 4),
        "batch": (in_tokens + tgt_tokens) * 3 * 4,
        "data": 0.0}
    # train: two float32 towers, float32 gradients, AdamW moments; activations of every layer kept for backward
    # (no rematerialisation in umr_jax/distill.py); the batch split over `data`.
    opt = adamw_bytes(2 * enc_params)
    n_pass = w.queries_per_batch * w.passages_per_query
    p_tok = n_pass * w.train_passage_padded / data_axis
    q_tok = w.queries_per_batch * w.train_query_padded / data_axis
    out["train"] = {
        "params": opt["params"], "adam": opt["adam_moments"], "grads": opt["grads"],
        "activations": model.layers * (
            p_tok * activation_bytes_per_token_layer(h, model.heads, w.train_passage_padded, model_axis)
            + q_tok * activation_bytes_per_token_layer(h, model.heads, w.train_query_padded, model_axis)),
        "batch": (p_tok + q_tok) * 3 * 4 + n_pass * 4 * 2,
        "data": 0.0}
    for v in out.values():
        v["total"] = sum(v[k] for k in ("params", "adam", "grads", "activations", "batch", "data"))
        v["fits"] = v["total"] <= 0.9 * p.hbm_bytes  # leave ~10% for XLA's workspace
    return out


# ----------------------------------------------------------------------------- sizes and ScaNN


def scann_params(n: int, k: int) -> dict[str, int]:
    """umr_jax/index.py `scann_params` with its default_config (leaves ~ sqrt(n), >= 3% searched, reorder 10 k)."""
    num_leaves = max(16, round(math.sqrt(n)))
    num_leaves = min(num_leaves, max(1, n // 20))
    cover = max(0.03, min(1.0, 50 * k / n))
    to_search = max(16, math.ceil(num_leaves * cover))
    return {"num_leaves": num_leaves, "leaves_to_search": min(to_search, num_leaves),
            "reorder": max(10 * k, 400), "training_sample_size": min(n, 250_000), "dims_per_block": 2}


SCALE_DIM = 32  # bench/scale.py's embedding dimension (configs/scale.py's random retriever)


def sizes(w: Workload, measured: dict[str, dict] | None = None) -> dict[str, float]:
    """Bytes of the embedding matrix and of each index backend at the repo's defaults; with bench/scale.py's
    figures, the measured host memory and disk per passage carried to the paper's dimension."""
    n, d = w.passages, w.embed_dim
    scaled = {}
    if measured and "scale_index_rss_bytes_per_passage" in measured:
        extra = d - SCALE_DIM
        ram = measured["scale_index_rss_bytes_per_passage"]["value"] + \
            assumption("scale_float32_copies_in_index_stage") * 4 * extra
        disk = measured["scale_encode_written_bytes_per_passage"]["value"] + 4 * extra
        scaled = {"index_stage_ram_per_passage": ram, "index_stage_ram_all_processes": n * ram,
                  "encode_written_per_passage": disk, "encode_written_per_round": n * disk}
    sp = scann_params(n, w.k)
    ah = n * math.ceil(d / sp["dims_per_block"]) * 4 / 8  # one 4-bit code per block of 2 dims
    reorder = n * d * 4  # ScaNN keeps the float32 dataset for the exact reordering
    return {
        "embeddings_f32": n * d * 4.0, "embeddings_f16": n * d * 2.0,
        "exact_index_f32": n * d * 4.0,
        # The exact index is built from the store's matrix, read once into one array (padding rows are
        # added device block by device block); a multi-process run splits it, each process its shard.
        "exact_host_ram_all_processes": n * d * 4.0,
        # Each round's workdir: embedding chunks (encode.dtype float32), passage ids (a DPR id and its
        # newline: ~9 bytes) and offsets (id hash + byte offset: 16 bytes); the exact index writes no data.
        "workdir_disk_per_round": n * (d * 4.0 + 9 + 16),
        "workdir_disk_total": w.encodings * n * (d * 4.0 + 9 + 16),
        "scann_ah_codes": ah, "scann_reorder_f32": reorder, "scann_centroids": sp["num_leaves"] * d * 4.0,
        "scann_leaf_ids": n * 4.0, "scann_total": ah + reorder + sp["num_leaves"] * d * 4.0 + n * 4.0,
        **scaled,
    }


def scann_work(n: int, dim: int, num_leaves: int, leaves_to_search: int, reorder: int, dims_per_block: int) -> float:
    """Work per query (multiply-adds and table look-ups): centroids, AH scan of the searched leaves, reorder."""
    points = n * leaves_to_search / num_leaves
    return num_leaves * dim + points * dim / dims_per_block + reorder * dim


def scann_estimate(measured: dict[str, dict], w: Workload, p: Platform, util: float) -> dict[str, float]:
    """ScaNN on the host CPUs instead of the exact search on the accelerators (not the paper's config)."""
    s = measured["_settings"].get("ann_1m_scann_setting") or {
        "vectors": 1_000_000, "dim": 384, "num_leaves": 1000, "leaves_to_search": 20, "reorder": 500,
        "dims_per_block": 2, "cores": 2}
    work_measured = scann_work(s["vectors"], s["dim"], s["num_leaves"], s["leaves_to_search"], s["reorder"],
                               s["dims_per_block"])
    sp = scann_params(w.passages, w.k)
    work = scann_work(w.passages, w.embed_dim, sp["num_leaves"], sp["leaves_to_search"], sp["reorder"],
                      sp["dims_per_block"])
    qps_per_vcpu = measured["ann_1m_scann_qps"]["value"] / s["cores"] * work_measured / work
    queries = w.train_queries + w.dev_queries
    search_s = queries / (qps_per_vcpu * p.host_vcpus)
    # build lower bound: k-means on the sample, assigning every vector to a leaf, AH encoding.
    d, n, leaves = w.embed_dim, w.passages, sp["num_leaves"]
    build_flops = (2 * sp["training_sample_size"] * leaves * d * assumption("scann_kmeans_iterations")
                   + 2 * n * leaves * d + 32 * n * d)
    per_vcpu_peak = measured["encode_f32_matmul_peak_gflops"]["value"] * 1e9 / 2
    build_s = build_flops / (p.host_vcpus * per_vcpu_peak * util)
    return {"params": sp, "work_ratio": work / work_measured, "qps_host": qps_per_vcpu * p.host_vcpus,
            "search_s": search_s, "build_flops": build_flops, "build_s_lower_bound": build_s}


# ----------------------------------------------------------------------------- time


def stage_times(flops: dict[str, dict[str, float]], util: dict[str, dict], w: Workload, p: Platform,
                model: Encoder, model_axis: int) -> dict:
    """Seconds per run: executed FLOPs / (chips x peak x utilisation).

    Two memory-bound terms that FLOPs miss are added: the exact search reads
    each device's corpus shard and writes and reads its score matrix once per
    query batch (the time is the larger of compute and HBM traffic), and every
    training step ends with an AdamW update over both towers' parameters.
    """
    out = {}
    for stage, f in flops.items():
        u = util[stage]["value"]
        compute = f["executed"] / (p.chips * p.peak_flops * u) if f["executed"] else 0.0
        seconds = compute
        if stage == "train":
            update = assumption("adamw_update_passes") * 4 * 2 * encoder_params_per_device(model, model_axis)
            seconds = compute + w.train_steps * update / p.hbm_bandwidth
        if stage == "search":
            rows = math.ceil(w.passages / p.chips)
            passes = math.ceil(w.train_queries / w.query_batch) + math.ceil(w.dev_queries / w.query_batch)
            per_pass = rows * w.embed_dim * 4 + 2 * w.query_batch * rows * 4  # corpus shard + score matrix
            seconds = max(compute, passes * per_pass / p.hbm_bandwidth)
        out[stage] = {"seconds": seconds, "compute_seconds": compute, "utilisation": u}
    return out


def evaluate(model: Encoder, teacher: T5, w: Workload, measured: dict, override: float | None,
             model_axis: int) -> dict:
    """The whole model for every platform, as one JSON-able dict."""
    flops = stage_flops(model, teacher, w)
    runs = runs_per_stage(w)
    util = utilisation(measured, override)
    result = {"workload": dataclasses.asdict(w) | {"train_steps": w.train_steps, "teacher_pairs": w.teacher_pairs,
                                                   "rank_evaluations": w.rank_evaluations},
              "models": {"retriever": dataclasses.asdict(model) | {"params": model.params()},
                         "teacher": dataclasses.asdict(teacher) | {"params": teacher.params()}},
              "flops_per_run": flops, "runs": runs, "utilisation": util, "sizes": sizes(w, measured),
              "flop_convention_check": flop_convention_check(measured),
              "assumptions": {a.name: {"value": a.value, "why": a.why} for a in ASSUMPTIONS.values()},
              "platforms": {}}
    for p in PLATFORMS:
        t = stage_times(flops, util, w, p, model, model_axis)
        total = sum(t[s]["seconds"] * runs[s] for s in t)
        first = ("encode", "index", "search")
        later = ("teacher", "train", "encode", "index", "search")
        rounds = [sum(t[s]["seconds"] for s in first)] + [sum(t[s]["seconds"] for s in later)] * w.rounds
        result["platforms"][p.key] = {
            "key": p.key, "name": p.name, "chips": p.chips, "source": p.source,
            "data_axis": max(1, p.chips // model_axis), "model_axis": model_axis,
            "stages": t, "rounds_seconds": rounds, "total_seconds": total,
            "total_hours": total / 3600, "chip_hours": total / 3600 * p.chips,
            "memory": memory_per_device(model, teacher, w, p, model_axis),
            "scann": scann_estimate(measured, w, p, util["search"]["value"]),
        }
    return result


# ----------------------------------------------------------------------------- report


STAGE_LABEL = {"encode": "encode corpus", "index": "build index (exact)", "search": "index + search (train + dev)",
               "teacher": "teacher scoring", "train": "training"}


def _t(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _gb(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.01 * GB else f"{b / 1e6:.1f} MB"


def report(r: dict) -> list[str]:
    w, f, runs, util = r["workload"], r["flops_per_run"], r["runs"], r["utilisation"]
    lines = ["## Paper-scale cost model: UMR on XOR-Retrieve (configs/xor.py)", ""]
    lines += [f"Retriever mContriever (mBERT-base, {r['models']['retriever']['params']:,} parameters, no pooler), "
              f"teacher mT5-XL ({r['models']['teacher']['params']:,} parameters); {w['passages']:,} passages, "
              f"{w['rounds']} rounds: {w['rounds'] + 1} corpus encodings, {w['teacher_pairs']:,} teacher pairs "
              f"({w['train_queries']:,} queries x k = {w['k']}) and {w['train_steps']:,} training steps "
              f"({w['train_queries'] - w['rank_queries']:,} queries; {w['rank_queries']} held out for "
              f"{w['rank_evaluations']} average-rank evaluations) "
              f"(B = {w['queries_per_batch']} x n = {w['passages_per_query']}, {w['epochs']:g} epochs) per round.", ""]
    lines += ["### Utilisation (CPU MFU as a proxy for the accelerator's)", "",
              "CPU model-FLOP utilisation is a proxy: it says how well our XLA programs keep the matmul units busy "
              "on a CPU, not what a TPU's systolic arrays or H100 tensor cores reach.", "",
              "| stage | utilisation | basis |", "|---|---|---|"]
    for stage in ("encode", "search", "teacher", "train"):
        lines.append(f"| {STAGE_LABEL[stage]} | {util[stage]['value']:.2f} | {util[stage]['basis']} |")
    c = r["flop_convention_check"]
    lines += ["", f"FLOP convention check: multilingual-e5-small at the measured bfloat16 rate "
                  f"({c['mean_tokens']:.1f} tokens per passage) is {c['model_gflops']:.0f} GFLOP/s by this model's "
                  f"formula, {c['measured_gflops']:.0f} GFLOP/s as measured."]
    lines += ["", "### FLOPs per run", "",
              "| stage | runs | model FLOPs per run (real tokens) | executed FLOPs per run (with padding) |",
              "|---|---|---|---|"]
    for stage in ("encode", "index", "search", "teacher", "train"):
        lines.append(f"| {STAGE_LABEL[stage]} | {runs[stage]} | {f[stage]['model']:.3g} | "
                     f"{f[stage]['executed']:.3g} |")
    total_model = sum(f[s]["model"] * runs[s] for s in f)
    total_exec = sum(f[s]["executed"] * runs[s] for s in f)
    lines.append(f"| **whole run** | | {total_model:.3g} | {total_exec:.3g} |")
    for p in r["platforms"].values():
        lines += ["", f"### {p['name']} ({p['chips']} chips; mesh data={p['data_axis']} x model={p['model_axis']})",
                  "", f"Spec: {p['source']}.", "",
                  "| stage | runs | utilisation | time per run | total | share |", "|---|---|---|---|---|---|"]
        for stage in ("encode", "index", "search", "teacher", "train"):
            s = p["stages"][stage]
            tot = s["seconds"] * runs[stage]
            lines.append(f"| {STAGE_LABEL[stage]} | {runs[stage]} | {s['utilisation']:.2f} | {_t(s['seconds'])} | "
                         f"{_t(tot)} | {tot / p['total_seconds']:.0%} |")
        rounds = " + ".join(_t(x) for x in p["rounds_seconds"])
        lines.append(f"| **whole run** | | | rounds {rounds} | **{_t(p['total_seconds'])}** | "
                     f"{p['chip_hours']:.1f} chip-hours |")
        lines += ["", "Memory per device (GB):", "",
                  "| stage | parameters | AdamW m + v | gradients | activations | batch (MB) | data | total | fits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for stage in ("encode", "search", "teacher", "train"):
            m = p["memory"][stage]
            lines.append(f"| {STAGE_LABEL[stage]} | {m['params'] / GB:.2f} | {m['adam'] / GB:.2f} | "
                         f"{m['grads'] / GB:.2f} | "
                         f"{m['activations'] / GB:.2f} | {m['batch'] / 1e6:.1f} | {m['data'] / GB:.2f} | "
                         f"{m['total'] / GB:.2f} | {'yes' if m['fits'] else 'NO'} |")
        sc = p["scann"]
        lines += ["", f"ScaNN instead (host CPU, {p['name']}'s host): {sc['params']['num_leaves']:,} leaves, "
                      f"{sc['params']['leaves_to_search']} searched, reorder {sc['params']['reorder']}; "
                      f"{sc['work_ratio']:.0f}x the work per query of the measured 1M setting -> "
                      f"~{sc['qps_host']:,.0f} q/s, search {_t(sc['search_s'])} per round; build >= "
                      f"{_t(sc['build_s_lower_bound'])} ({sc['build_flops']:.2g} FLOPs; a lower bound)."]
    s = r["sizes"]
    lines += ["", "### Sizes", "", "| what | bytes |", "|---|---|",
              f"| embedding matrix, float32 (encode.dtype default) | {_gb(s['embeddings_f32'])} |",
              f"| embedding matrix, float16 | {_gb(s['embeddings_f16'])} |",
              f"| exact index on the devices (index.exact.dtype float32) | {_gb(s['exact_index_f32'])} |",
              f"| host RAM while building the exact index, summed over the processes (the matrix once) | "
              f"{_gb(s['exact_host_ram_all_processes'])} |",
              f"| workdir disk per round (embedding chunks, ids, line offsets; the exact index adds none) | "
              f"{_gb(s['workdir_disk_per_round'])} |",
              f"| workdir disk, whole run ({w['rounds'] + 1} encodings) | {_gb(s['workdir_disk_total'])} |",
              f"| ScaNN: AH codes (4 bits per 2 dims) | {_gb(s['scann_ah_codes'])} |",
              f"| ScaNN: float32 dataset kept for reordering | {_gb(s['scann_reorder_f32'])} |",
              f"| ScaNN: tree centroids + leaf ids | {_gb(s['scann_centroids'] + s['scann_leaf_ids'])} |",
              f"| ScaNN index total | {_gb(s['scann_total'])} |"]
    if "index_stage_ram_per_passage" in s:
        lines += [f"| host RAM growth of the index stage with ScaNN, summed over the processes (bench/scale.py: "
                  f"{s['index_stage_ram_per_passage']:,.0f} bytes a passage at {w['embed_dim']} dimensions) | "
                  f"{_gb(s['index_stage_ram_all_processes'])} |",
                  f"| disk written per corpus encoding (bench/scale.py: {s['encode_written_per_passage']:,.0f} "
                  f"bytes a passage at {w['embed_dim']} dimensions) | {_gb(s['encode_written_per_round'])} |"]
    lines += ["", "### Assumptions", ""]
    lines += [f"- `{name}` = {a['value']:,.0f}: {a['why']}" if a["value"] == int(a["value"])
              else f"- `{name}` = {a['value']:g}: {a['why']}" for name, a in r["assumptions"].items()]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", default=str(HERE / "measured.json"), help="measured CPU figures (JSON)")
    parser.add_argument("--json_out", default="", help="also write the whole model here as JSON")
    parser.add_argument("--utilisation_override", type=float, default=None,
                        help="one utilisation (0, 1] for every accelerator stage instead of the measured proxies")
    parser.add_argument("--passages", type=int, default=int(assumption("passages")), help="corpus size")
    parser.add_argument("--model_axis", type=int, default=int(assumption("model_axis")), help="`model` mesh axis")
    args = parser.parse_args(argv)
    if args.utilisation_override is not None and not 0 < args.utilisation_override <= 1:
        parser.error(f"--utilisation_override must be in (0, 1], got {args.utilisation_override}")
    if args.passages <= 0:
        parser.error(f"--passages must be positive, got {args.passages}")
    measured = load_measured(args.measured)
    result = evaluate(MBERT, MT5_XL, default_workload(args.passages), measured, args.utilisation_override,
                      args.model_axis)
    result["measured_file"] = args.measured
    headline = {f"paper_scale_hours_{key}": p["total_hours"] for key, p in result["platforms"].items()}
    result["headline"] = headline
    print("\n".join(report(result)))
    print()
    if args.json_out:
        pathlib.Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n", "utf-8")
        print(f"wrote {args.json_out}")
    print(f"paper_scale_hours_8xh100: {headline['paper_scale_hours_8xh100']:.3f}")
    print(f"paper_scale_hours_tpu_v4_32: {headline['paper_scale_hours_tpu_v4_32']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
