"""Teacher scoring throughput: umr_jax vs the PyTorch ways, same pairs, one run.

    python bench/score.py [--num_pairs=512] [--skip_mt5 | --skip_gemma]

Scores the same (query, candidate) pairs from XQuAD-R (questions of all 11
languages, each with a candidate sentence: its own answer's paragraph or a
random one) with the UMR prompt, log P(Question: q | Passage: ... in
{Language}.), mean over target tokens:

  * Gemma-3-270M (the real GGUF weights; PyTorch gets the same float32 weights
    through our export, so the models are identical):
      - ours: the Teacher (packed rows, target-only LM head, chunked
        log-sum-exp), warm, in float32 and -- where the hardware has bf16 units,
        as the default config ("auto") then does -- in bfloat16 with float32
        accumulation and logits;
      - PyTorch the official way (as UMR's and UPR's code): batches of
        --official_batch pairs in input order, padded to the longest, the full
        (batch x length x vocab) logits, log_softmax, gather;
      - PyTorch at its best: sorted by length, dynamic padding, the LM head only
        at target positions, the best of --torch_batch_sizes; float32, and
        bfloat16 autocast (reported, on a subset: CPUs without bf16 units are
        slow at it);
  * the same three on a random mT5-small-shaped model (8 + 8 layers, d_model
    512, vocab 250,112), XLM-R tokens standing in for mT5's;
  * our model-FLOP utilisation against a float32 JAX matmul peak measured in
    the same run.

Every contender is warmed up first; ours and PyTorch-best are timed in
interleaved rounds (best counts) so that machine noise hits them alike. The last
two lines are the headline ratios, Gemma: ours (the default config's dtype)
/ official and ours / PyTorch float32 at its best; the float32-only ratios and
ours-bf16 / PyTorch-bf16-autocast are printed above them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time

from absl import app, flags

from common import DEFAULT_DATA_DIR, best_time, jax_matmul_peak, machine, xquad_r_paragraphs  # sets XLA_FLAGS first

_NUM = flags.DEFINE_integer("num_pairs", 512, "How many (query, candidate) pairs to score.")
_DATA = flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Directory holding xquad-r/.")
_SEED = flags.DEFINE_integer("seed", 0, "Pair sampling seed.")
_OFFICIAL_BATCH = flags.DEFINE_integer(
    "official_batch", 8, "Batch size of the official way. 32 runs out of 24 GB here: one 550-token pair pads its "
    "batch to 550 positions x 262k vocab, 18 GB of float32 logits before log_softmax copies them.")
_TORCH_BATCHES = flags.DEFINE_list("torch_batch_sizes", ["8", "16", "32", "64"],
                                   "Batch sizes tried for PyTorch at its best (on --sweep_pairs pairs).")
_SWEEP_PAIRS = flags.DEFINE_integer("sweep_pairs", 128, "Pairs used to pick PyTorch's best batch size.")
_BF16_PAIRS = flags.DEFINE_integer("bf16_pairs", 128, "Pairs timed with bfloat16 autocast (0 = skip).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved timed rounds of ours and PyTorch-best.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 0, "Override the teacher's token budget per batch.")
_SKIP_MT5 = flags.DEFINE_bool("skip_mt5", False, "Only the Gemma part.")
_SKIP_GEMMA = flags.DEFINE_bool("skip_gemma", False, "Only the mT5 part.")

MT5_SMALL = dict(vocab_size=250_112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                 num_heads=6, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)


@dataclasses.dataclass
class Pairs:
    queries: list[str]
    passages: list[str]
    languages: list[str]


def sample_pairs(data_dir: str, n: int, seed: int) -> Pairs:
    """Questions of all languages, each with a sentence of its own paragraph or of a random one."""
    rng = random.Random(seed)
    paragraphs = xquad_r_paragraphs(data_dir)
    questions = [(lang, qa["question"], i) for i, (lang, para) in enumerate(paragraphs) for qa in para["qas"]]
    out = Pairs([], [], [])
    for lang, question, para_index in rng.sample(questions, n):
        source = para_index if rng.random() < 0.5 else rng.randrange(len(paragraphs))
        out.queries.append(question)
        out.passages.append(rng.choice(paragraphs[source][1]["sentences"]))
        out.languages.append(lang)
    return out


# ----------------------------------------------------------------------------- PyTorch scorers


def _per_pair_means(picked, rows, targets, out) -> None:
    """`picked` holds the target log-probs of `rows`, pair after pair: their means go to out[row]."""
    offset = 0
    for i in rows:
        n = len(targets[i])
        out[i] = float(picked[offset:offset + n].mean())
        offset += n


def torch_decoder_scores(model, pairs, order, batch_size: int, pad_id: int, full_logits: bool,
                         autocast: bool = False):
    """Mean target log-prob per pair with a transformers causal LM (right padding)."""
    import numpy as np
    import torch
    out = np.zeros(len(pairs.inputs), np.float64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            seqs = [pairs.inputs[i] + pairs.targets[i] for i in rows]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, x in enumerate(seqs):
                ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
            # Target token j of row r sits at len(prompt) + j and is predicted at the position before.
            pos = [(r, len(pairs.inputs[i]) - 1 + j) for r, i in enumerate(rows) for j in range(len(pairs.targets[i]))]
            rr = torch.tensor([p[0] for p in pos])
            cc = torch.tensor([p[1] for p in pos])
            labels = torch.tensor([t for i in rows for t in pairs.targets[i]])
            if full_logits:  # the official way: every position, the whole vocabulary
                logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                picked = logp[rr, cc, labels]
            else:
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = model.lm_head(hidden[rr, cc]).float()
                picked = torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels]
            _per_pair_means(picked, rows, pairs.targets, out)
    return out


def torch_seq2seq_scores(model, pairs, order, batch_size: int, pad_id: int, start_id: int, full_logits: bool,
                         autocast: bool = False):
    """Mean target log-prob per pair with a transformers encoder-decoder."""
    import numpy as np
    import torch
    out = np.zeros(len(pairs.inputs), np.float64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            width = max(len(pairs.inputs[i]) for i in rows)
            tw = max(len(pairs.targets[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), tw), -100, dtype=torch.long)
            for r, i in enumerate(rows):
                x, y = pairs.inputs[i], pairs.targets[i]
                ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
                labels[r, :len(y)] = torch.tensor(y)
            decoder_ids = torch.cat([torch.full((len(rows), 1), start_id), labels[:, :-1].clamp(min=0)], 1)
            valid = labels >= 0
            if full_logits:  # the official way (UPR/UMR): labels in, full logits out
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.float()
                logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
                picked = logp[valid]
            else:
                encoded = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                hidden = model.decoder(input_ids=decoder_ids, encoder_hidden_states=encoded,
                                       encoder_attention_mask=mask).last_hidden_state
                logits = model.lm_head(hidden[valid]).float()
                picked = torch.log_softmax(logits, -1)[torch.arange(int(valid.sum())), labels[valid]]
            _per_pair_means(picked, rows, pairs.targets, out)
    return out


# ----------------------------------------------------------------------------- FLOPs


def gemma_flops(pairs, cfg) -> float:
    """Matmul FLOPs on real tokens: projections, FFN, attention (window-limited), LM head at targets."""
    h, q, kv, d, m = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                      cfg.intermediate_size)
    per_token = 2 * (h * q * d * 2 + h * kv * d * 2 + 3 * h * m)
    total = 0.0
    for x, y in zip(pairs.inputs, pairs.targets, strict=True):
        n = len(x) + len(y)
        for kind in cfg.layer_types:
            window = cfg.sliding_window if kind == "sliding_attention" else n
            context = sum(min(t + 1, window) for t in range(n))
            total += per_token * n + 4 * q * d * context
        total += 2 * h * cfg.vocab_size * len(y)
    return total


def t5_flops(pairs, cfg) -> float:
    h, inner, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    total = 0.0
    for x, y in zip(pairs.inputs, pairs.targets, strict=True):
        s, t = len(x), len(y)
        enc = cfg.num_layers * (2 * s * (4 * h * inner + 3 * h * f) + 4 * s * s * inner)
        dec = cfg.num_decoder_layers * (2 * t * (6 * h * inner + 3 * h * f) + 4 * s * h * inner
                                        + 2 * t * (t + 1) * inner + 4 * t * s * inner)
        total += enc + dec + 2 * t * h * cfg.vocab_size
    return total


# ----------------------------------------------------------------------------- one model


def compare(name: str, ours, tpairs, torch_fn, flops: float, peak: float, ours_bf16=None) -> dict:
    """Times ours, PyTorch official, PyTorch best (f32 sweep, bf16 subset); returns pairs/s.

    `ours` computes in float32; `ours_bf16` (when the hardware has bf16 units)
    is the same weights in bfloat16 compute, what the default config picks.
    """
    import numpy as np
    n = len(tpairs.inputs)
    lengths = np.array([len(x) + len(y) for x, y in zip(tpairs.inputs, tpairs.targets, strict=True)])
    by_length = np.argsort(lengths, kind="stable")
    in_order = np.arange(n)
    start = time.perf_counter()
    ours_scores = ours.score_tokens(tpairs, progress=False)
    print(f"[{name}] ours: first run (with compilation) {time.perf_counter() - start:.1f}s", flush=True)
    bf16_scores = ours_bf16.score_tokens(tpairs, progress=False) if ours_bf16 is not None else None

    # PyTorch's best batch size on a random subset, sorted as it will run.
    rng = np.random.default_rng(0)
    subset = np.sort(rng.choice(n, min(n, _SWEEP_PAIRS.value), replace=False))
    subset = subset[np.argsort(lengths[subset], kind="stable")]
    torch_fn(subset[:8], 8, full_logits=False)  # warm-up
    sweep = {}
    for bs in (int(b) for b in _TORCH_BATCHES.value):
        sweep[bs] = best_time(lambda bs=bs: torch_fn(subset, bs, full_logits=False), 1)
        print(f"[{name}] pytorch best-way float32 batch {bs}: {len(subset) / sweep[bs]:.2f} pairs/s", flush=True)
    best_bs = min(sweep, key=sweep.get)

    t_ours, t_bf16, t_best, ref = [], [math.inf], [], None
    for _ in range(_REPEATS.value):
        t_ours.append(best_time(lambda: ours.score_tokens(tpairs, progress=False), 1))
        if ours_bf16 is not None:
            t_bf16.append(best_time(lambda: ours_bf16.score_tokens(tpairs, progress=False), 1))
        start = time.perf_counter()
        ref = torch_fn(by_length, best_bs, full_logits=False)
        t_best.append(time.perf_counter() - start)
        bf16_round = f"ours bfloat16 {n / t_bf16[-1]:.2f}, " if ours_bf16 is not None else ""
        print(f"[{name}] round: ours float32 {n / t_ours[-1]:.2f}, {bf16_round}pytorch best {n / t_best[-1]:.2f} "
              "pairs/s", flush=True)
    t_ours, t_bf16, t_best = min(t_ours), min(t_bf16), min(t_best)

    start = time.perf_counter()
    official = torch_fn(in_order, _OFFICIAL_BATCH.value, full_logits=True)
    t_official = time.perf_counter() - start
    print(f"[{name}] pytorch official (batch {_OFFICIAL_BATCH.value}, full logits): {n / t_official:.2f} pairs/s",
          flush=True)
    bf16 = float("nan")
    if _BF16_PAIRS.value:
        sub = subset[: _BF16_PAIRS.value]
        torch_fn(sub[:8], 8, full_logits=False, autocast=True)
        bf16 = len(sub) / best_time(lambda: torch_fn(sub, best_bs, full_logits=False, autocast=True), 1)
    diff = float(np.abs(ours_scores - ref).max())
    diff_official = float(np.abs(official - ref).max())
    result = dict(ours_f32=n / t_ours, ours_bf16=n / t_bf16, best=n / t_best, official=n / t_official, bf16=bf16,
                  best_bs=best_bs, mfu=flops / t_ours / peak, gflops=flops / t_ours / 1e9)
    # The headline "ours" is what the default config runs: bfloat16 where the hardware has it.
    result["ours"] = result["ours_bf16"] if ours_bf16 is not None else result["ours_f32"]
    print(f"[{name}] ours float32 {result['ours_f32']:.2f} pairs/s; pytorch best float32 {result['best']:.2f} "
          f"(batch {best_bs}); pytorch official {result['official']:.2f}; pytorch bf16 autocast {bf16:.2f} "
          f"(on {_BF16_PAIRS.value} pairs); max |ours - pytorch| = {diff:.2e} (official vs best {diff_official:.2e})")
    if bf16_scores is not None:
        rank = np.corrcoef(np.argsort(np.argsort(bf16_scores)), np.argsort(np.argsort(ours_scores)))[0, 1]
        print(f"[{name}] ours bfloat16 {result['ours_bf16']:.2f} pairs/s; vs our float32 scores: max |diff| "
              f"{float(np.abs(bf16_scores - ours_scores).max()):.3f}, Spearman {rank:.5f}; vs pytorch bf16 autocast "
              f"{result['ours_bf16'] / bf16:.2f}x")
    print(f"[{name}] model FLOPs {flops / 1e9:.1f} GFLOP; ours float32 {result['gflops']:.1f} GFLOP/s = MFU "
          f"{result['mfu']:.2f} of the float32 peak; speedup (default dtype) vs official "
          f"{result['ours'] / result['official']:.2f}, vs best {result['ours'] / result['best']:.2f}; float32 only: vs "
          f"official {result['ours_f32'] / result['official']:.2f}, vs best {result['ours_f32'] / result['best']:.2f}",
          flush=True)
    return result


def main(argv):
    del argv
    import jax
    import torch
    import transformers

    from umr_jax import sharding
    from umr_jax.models.layers import resolve_auto_dtype

    torch.set_num_threads(os.cpu_count() or 1)
    mesh = sharding.make_mesh((-1, 1))
    raw = sample_pairs(_DATA.value, _NUM.value, _SEED.value)
    peak_single, peak_parallel = jax_matmul_peak(mesh)
    peak = max(peak_single, peak_parallel)
    print(f"{_NUM.value} pairs; {os.cpu_count()} CPU cores, JAX mesh {dict(mesh.shape)}; jax {jax.__version__}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers "
          f"{transformers.__version__}; float32 matmul peak {peak_single / 1e9:.1f} GFLOP/s on one device, "
          f"{peak_parallel / 1e9:.1f} over the mesh", flush=True)
    print(f"machine: {machine('auto = ' + resolve_auto_dtype('auto') + '; ours timed in float32 and in auto')}",
          flush=True)

    results = {}
    if not _SKIP_GEMMA.value:
        results["gemma"] = bench_gemma(raw, mesh, peak)
    if not _SKIP_MT5.value:
        results["mt5"] = bench_mt5(raw, mesh, peak)
    if "mt5" in results:
        m = results["mt5"]
        print(f"mt5_small_speedup_vs_pytorch_official: {m['ours'] / m['official']:.2f}")
        print(f"mt5_small_speedup_vs_pytorch: {m['ours'] / m['best']:.2f}")
    if "gemma" in results:
        g = results["gemma"]
        print(f"score_speedup_vs_pytorch_official: {g['ours'] / g['official']:.2f}")
        print(f"score_speedup_vs_pytorch: {g['ours'] / g['best']:.2f}")


def bench_gemma(raw: Pairs, mesh, peak: float) -> dict:
    """Gemma-3-270M with its real weights: ours float32 (and bfloat16 where `auto` picks it) vs PyTorch."""
    import numpy as np
    import torch
    import transformers

    from umr_jax import teacher
    from umr_jax.models import gemma_weights
    from umr_jax.models.layers import resolve_auto_dtype

    cfg = teacher.default_config()
    if _TOKENS.value:
        cfg.tokens_per_batch = _TOKENS.value
    default_dtype = resolve_auto_dtype(cfg.dtype)
    cfg.param_dtype = cfg.dtype = "float32"
    start = time.perf_counter()
    gemma = teacher.Teacher.from_config(cfg, mesh)
    print(f"gemma: loaded in {time.perf_counter() - start:.1f}s; the default config computes in {default_dtype} "
          "on this machine", flush=True)
    gemma_bf16 = None
    if default_dtype == "bfloat16":
        model = gemma_weights.build_gemma(gemma.model.config, param_dtype="bfloat16", dtype="bfloat16",
                                          random_init=False)
        gemma_weights.load_hf_weights(model, gemma_weights.export_hf_weights(gemma.model), "gemma float32")
        bf16_cfg = cfg.copy_and_resolve_references()
        bf16_cfg.tokens_per_batch = _TOKENS.value or teacher.default_config().tokens_per_batch
        gemma_bf16 = teacher.Teacher(model, gemma.tokenizer, bf16_cfg, mesh)
        cfg.tokens_per_batch = _TOKENS.value or 2048  # float32's best on a 2-core CPU
    tpairs = gemma.tokenize(raw.queries, raw.passages, raw.languages)
    lengths = [len(x) + len(y) for x, y in zip(tpairs.inputs, tpairs.targets, strict=True)]
    print(f"gemma: mean {np.mean(lengths):.1f} tokens per pair (max {max(lengths)}), mean target "
          f"{np.mean([len(y) for y in tpairs.targets]):.1f} tokens", flush=True)
    hf_cfg = transformers.Gemma3TextConfig(**{k: v for k, v in gemma.model.config.to_hf_dict().items()
                                              if k not in ("architectures", "model_type")})
    ref = transformers.Gemma3ForCausalLM(hf_cfg).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in gemma_weights.export_hf_weights(gemma.model).items()})
    pad = gemma.pad_id

    def gemma_torch(order, bs, full_logits, autocast=False):
        return torch_decoder_scores(ref, tpairs, order, bs, pad, full_logits, autocast)

    return compare("gemma", gemma, tpairs, gemma_torch, gemma_flops(tpairs, gemma.model.config), peak, gemma_bf16)


def bench_mt5(raw: Pairs, mesh, peak: float) -> dict:
    """A random mT5-small-shaped model: ours float32 (and bfloat16 where `auto` picks it) vs PyTorch."""
    import torch
    import transformers

    from umr_jax import teacher
    from umr_jax.models import t5_weights
    from umr_jax.models.hf_checkpoint import default_e5_tokenizer_file, load_tokenizer
    from umr_jax.models.layers import resolve_auto_dtype
    from umr_jax.models.t5 import T5Config

    tokenizer = load_tokenizer(default_e5_tokenizer_file())
    t5_ref = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**MT5_SMALL)).eval()
    # A real (untied) mT5 layout: a head of its own, not the shared embedding.
    t5_ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(t5_ref.shared.weight) * 0.05)
    weights = {k: v.detach().numpy() for k, v in t5_ref.state_dict().items()}
    config = T5Config(**MT5_SMALL)
    cfg = teacher.default_config()
    cfg.model = "mt5"
    if _TOKENS.value:
        cfg.tokens_per_batch = _TOKENS.value
    default_dtype = resolve_auto_dtype(cfg.dtype)
    print(f"mt5-small: the default config computes in {default_dtype} on this machine", flush=True)

    def ours(dtype: str):
        model = t5_weights.build_mt5(config, param_dtype=dtype, dtype=dtype, seed=0, random_init=False)
        t5_weights.load_hf_weights(model, weights, "random mT5-small")
        run_cfg = cfg.copy_and_resolve_references()
        run_cfg.param_dtype = run_cfg.dtype = dtype
        return teacher.Teacher(model, tokenizer, run_cfg, mesh)

    t5 = ours("float32")
    t5_bf16 = ours("bfloat16") if default_dtype == "bfloat16" else None
    t5_pairs = t5.tokenize(raw.queries, raw.passages, raw.languages)

    def t5_torch(order, bs, full_logits, autocast=False):
        return torch_seq2seq_scores(t5_ref, t5_pairs, order, bs, t5.pad_id, config.decoder_start_token_id,
                                    full_logits, autocast)

    return compare("mt5-small", t5, t5_pairs, t5_torch, t5_flops(t5_pairs, config), peak, t5_bf16)


if __name__ == "__main__":
    app.run(main)
