"""Corpus encoding throughput: umr_jax vs transformers PyTorch, same inputs, one run.

    python bench/encode.py [--num_passages=2000] [--max_length=128]

Encodes XQuAD-R candidate sentences (all 11 languages, read from
../shared/data/xquad-r) as passages with multilingual-e5-small at max length
128. Every contender gets the same token ids and the same weights, is warmed up
first, and is timed end to end from token ids to float32 embeddings on the host:
  * ours: the Retriever's jitted, length-bucketed encode;
  * PyTorch float32 at its best: sorted by length, dynamic padding, the best of
    several batch sizes, inference mode;
  * PyTorch bfloat16 autocast, same batching.
A float32 matmul peak measured by JAX in the same run gives our model-FLOP
utilisation. The last line is the headline ratio.
"""

from __future__ import annotations

import os
import pathlib
import time

from absl import app, flags

from common import (  # sets XLA_FLAGS first
    DEFAULT_DATA_DIR,
    best_time,
    jax_matmul_peak,
    machine,
    model_flops,
    xquad_r_paragraphs,
)

_NUM = flags.DEFINE_integer("num_passages", 2000, "How many candidate sentences to encode.")
_MAX_LEN = flags.DEFINE_integer("max_length", 128, "Max tokens per passage.")
_DATA = flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Directory holding xquad-r/.")
_TORCH_BATCHES = flags.DEFINE_list("torch_batch_sizes", ["16", "32", "64", "128"],
                                   "PyTorch batch sizes to try; the best counts.")
_TOKENS = flags.DEFINE_integer("tokens_per_batch", 0, "Override the retriever's token budget per batch.")
_BF16 = flags.DEFINE_bool("bf16_autocast", True, "Also time PyTorch with bfloat16 autocast, once, at "
                           "the float32 winner's batch size.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Our compute dtype: float32, bfloat16 or auto (bfloat16 "
                             "where the CPU has bf16 units, as configs/xquad_r.py encodes).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved timed rounds (best counts).")


def candidate_sentences(data_dir: pathlib.Path, n: int) -> list[str]:
    """An even sample of the pooled multilingual candidates (sentence only)."""
    pool = [sentence for _, para in xquad_r_paragraphs(data_dir) for sentence in para["sentences"]]
    step = max(1, len(pool) // n)
    return pool[::step][:n]


def main(argv):
    del argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    import transformers

    from umr_jax import sharding
    from umr_jax.retriever import Retriever, default_config

    torch.set_num_threads(os.cpu_count() or 1)
    texts = candidate_sentences(pathlib.Path(_DATA.value), _NUM.value)
    cfg = default_config()
    cfg.max_passage_length = _MAX_LEN.value
    cfg.dtype = _DTYPE.value
    if _TOKENS.value:
        cfg.tokens_per_batch = _TOKENS.value
    import jax
    mesh = sharding.make_mesh((-1, 1))
    retriever = Retriever.from_config(cfg, mesh)
    token_ids = retriever.tokenize(texts, "passage")
    lengths = [len(t) for t in token_ids]
    print(f"{len(texts)} passages, {sum(lengths)} tokens, mean length {np.mean(lengths):.1f}, "
          f"max {max(lengths)}; {os.cpu_count()} CPU cores, JAX mesh {dict(mesh.shape)}; "
          f"jax {jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"ours in {retriever.tower('passage').dtype}")
    ours_dtype = np.dtype(retriever.tower("passage").dtype).name
    print(f"machine: {machine(f'ours {ours_dtype} (--dtype={_DTYPE.value}), pytorch float32')}", flush=True)

    # --- ours ---
    def ours():
        return retriever.encode_tokens(token_ids, "passage", progress=False)
    start = time.perf_counter()
    ours_emb = ours()
    print(f"ours: first run (with compilation) {time.perf_counter() - start:.1f}s", flush=True)

    # --- PyTorch reference with the same weights ---
    from umr_jax.models.bert_weights import export_hf_weights
    enc = retriever.tower("passage")
    hf_cfg = transformers.BertConfig(**{k: v for k, v in enc.config.to_hf_dict().items()
                                        if k not in ("architectures", "model_type")})
    ref = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in export_hf_weights(enc).items()})
    order = np.argsort(lengths, kind="stable")

    def torch_encode(batch_size: int, autocast: bool, limit: int | None = None) -> np.ndarray:
        out = np.zeros((len(token_ids), hf_cfg.hidden_size), np.float32)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for s in range(0, len(order) if limit is None else min(limit, len(order)), batch_size):
                rows = order[s:s + batch_size]
                width = max(lengths[i] for i in rows)
                ids = torch.full((len(rows), width), retriever.pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    ids[r, :lengths[i]] = torch.tensor(token_ids[i])
                    mask[r, :lengths[i]] = 1
                h = ref(input_ids=ids, attention_mask=mask).last_hidden_state.float()
                m = mask[..., None].float()
                pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
                out[rows] = pooled.numpy()
        return out

    # Pick PyTorch's best float32 batch size, then time ours and it
    # interleaved so that machine noise hits them alike.
    torch_encode(32, False, limit=256)  # warm-up (PyTorch has nothing to compile)
    sweep = {}
    for bs in (int(b) for b in _TORCH_BATCHES.value):
        sweep[bs] = best_time(lambda bs=bs: torch_encode(bs, False), 1)
        print(f"pytorch float32 batch {bs}: {len(texts) / sweep[bs]:.1f} passages/s", flush=True)
    best_bs = min(sweep, key=sweep.get)
    t_ours, t_f32 = [], []
    for _ in range(_REPEATS.value):
        t_ours.append(best_time(ours, 1))
        start = time.perf_counter()
        ref_emb = torch_encode(best_bs, False)
        t_f32.append(time.perf_counter() - start)
        print(f"round: ours {len(texts) / t_ours[-1]:.1f}, pytorch f32 {len(texts) / t_f32[-1]:.1f} passages/s",
              flush=True)
    t_ours, t_f32 = min(t_ours), min(t_f32)
    t_bf16 = float("nan")
    if _BF16.value:  # once: on CPUs without bf16 units it is several times slower than float32
        torch_encode(best_bs, True, limit=256)
        t_bf16 = best_time(lambda: torch_encode(best_bs, True), 1)
    max_diff = float(np.abs(ref_emb - ours_emb).max())

    peak_single, peak_parallel = jax_matmul_peak(mesh, ours_dtype)
    peak = max(peak_single, peak_parallel)
    flops = model_flops(lengths, hf_cfg.hidden_size, hf_cfg.intermediate_size, hf_cfg.num_hidden_layers)
    print(f"ours: {len(texts) / t_ours:.1f} passages/s ({t_ours:.2f}s), max |ours - pytorch| = {max_diff:.2e}")
    print(f"pytorch float32 best: {len(texts) / t_f32:.1f} passages/s (batch {best_bs})")
    if _BF16.value:
        print(f"pytorch bf16 autocast: {len(texts) / t_bf16:.1f} passages/s (batch {best_bs})")
    print(f"jax {ours_dtype} matmul peak (2048^3, float32 accumulation): {peak_single / 1e9:.1f} GFLOP/s "
          f"on one device, "
          f"{peak_parallel / 1e9:.1f} GFLOP/s data-parallel over the mesh")
    print(f"model FLOPs {flops / 1e9:.1f} GFLOP; ours {flops / t_ours / 1e9:.1f} GFLOP/s = "
          f"MFU {flops / t_ours / peak:.2f}; pytorch f32 {flops / t_f32 / 1e9:.1f} GFLOP/s")
    if _BF16.value:
        print(f"encode_speedup_vs_pytorch_bf16_autocast: {t_bf16 / t_ours:.2f}")
    print(f"encode_speedup_vs_pytorch: {t_f32 / t_ours:.2f}")


if __name__ == "__main__":
    app.run(main)
