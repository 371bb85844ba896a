"""Text generation throughput: umr_jax's jitted generate vs transformers' generate, same prompts, one run.

    python bench/generate.py [--batch_size=8] [--max_new_tokens=32] [--num_beams=1] [--breakdown]

Generates from the same reader-style prompts (an instruction, a passage of a
few XQuAD-R sentences and its question, in all 11 languages; --min/--max_prompt_tokens
long, --num_prompts of them, read from ../shared/data/xquad-r) with the real
Gemma-3-270M of the packaged GGUF, float32 on both sides:

  * ours: ``umr_jax.generate.compile_generate``, the reader stage's program,
    each batch's prompts right-padded to its longest (rounded up to a
    multiple of 8; one compiled program per width), over the JAX mesh
    (--mesh_shape, default the reader's: weights split over the cores);
  * transformers: ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``
    (the same file; its weights equal ours, tests/test_gemma.py checks it),
    ``generate`` with the prompts left-padded per batch to the batch's longest,
    an attention mask, ``do_sample=False``, ``use_cache=True``, torch with one
    thread per core, under ``torch.inference_mode``.

Both generate exactly --max_new_tokens tokens per row: the end-of-sequence id
is one the model never produces (--eos_id, ``<unused0>``), checked afterwards.
Greedy decoding is the headline; --num_beams > 1 runs beam search on both
sides (length penalty 1, transformers' default early stopping). --model=mt5_small
runs the same comparison on a random mT5-small-shaped encoder-decoder (mGEN's
architecture; pick an --eos_id the prompts do not hold, e.g. 250100).

Each side is warmed up untimed (ours: the compilation, on the first batch's
shape; transformers: one call), then both are timed in --repeats interleaved
rounds over all batches (the best round counts), each from host token ids to
host token ids. Reported: new tokens/s (rows x new tokens / seconds) and
seconds per batch (prompt + generation), the rows whose tokens agree token for
token between the two, and, with --breakdown, the same at max_new_tokens=1
(prefill and the first token), from which the per-step decode cost follows.
The last line is the headline ratio, ours tokens/s / transformers tokens/s.
"""

from __future__ import annotations

import os
import random
import time

from absl import app, flags

from common import DEFAULT_DATA_DIR, ForeignLoad, best_time, machine, xquad_r_paragraphs  # sets XLA_FLAGS first

_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generate call (both sides).")
_NEW = flags.DEFINE_integer("max_new_tokens", 32, "New tokens per row; both sides generate exactly this many.")
_BEAMS = flags.DEFINE_integer("num_beams", 1, "1: greedy (the headline); more: beam search on both sides.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved timed rounds over all batches (best counts).")
_NUM = flags.DEFINE_integer("num_prompts", 16, "How many prompts (spread over the 11 languages).")
_MIN_TOKENS = flags.DEFINE_integer("min_prompt_tokens", 150, "Shortest prompt, in tokens (BOS included).")
_MAX_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 250, "Longest prompt, in tokens (BOS included).")
_DATA = flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Directory holding xquad-r/.")
_SEED = flags.DEFINE_integer("seed", 0, "Which paragraphs make the prompts.")
_EOS = flags.DEFINE_integer("eos_id", 6, "End-of-sequence id given to both sides: one the model never produces "
                            "(6 is <unused0>), so that every row runs to --max_new_tokens.")
_MESH = flags.DEFINE_list("mesh_shape", ["1", "-1"], "Ours: the (data, model) mesh. 1,-1 (read.mesh_shape's default) "
                          "splits heads, MLP and vocabulary over the cores; -1,1 splits the rows instead.")
_MODEL = flags.DEFINE_enum("model", "gemma3", ["gemma3", "mt5_small"], "gemma3: the real Gemma-3-270M; mt5_small: "
                            "a random mT5-small-shaped encoder-decoder (mGEN's architecture; random weights, the "
                            "e5 tokenizer's 250k vocabulary), the same weights on both sides.")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also time both at max_new_tokens=1 (prefill + one token) to "
                               "split the time into prefill and per-step decode (one more compilation).")

PROMPT = "Answer the question using the passage.\n\nPassage: {passage}\n\nQuestion: {question}\n\nAnswer:"


def reader_prompts(tokenizer, data_dir: str, n: int, min_tokens: int, max_tokens: int,
                   seed: int) -> list[tuple[str, list[int]]]:
    """(language, token ids) of `n` prompts, languages in turn: a question and the leading sentences of its
    paragraph, as many as fit in max_tokens; paragraphs that cannot reach min_tokens are skipped."""
    rng = random.Random(seed)
    by_lang: dict[str, list[dict]] = {}
    for lang, para in xquad_r_paragraphs(data_dir):
        by_lang.setdefault(lang, []).append(para)
    langs = sorted(by_lang)
    for paras in by_lang.values():
        rng.shuffle(paras)
    out, cursor = [], dict.fromkeys(langs, 0)
    while len(out) < n:
        lang = langs[len(out) % len(langs)]
        paras = by_lang[lang]
        while cursor[lang] < len(paras):
            para = paras[cursor[lang]]
            cursor[lang] += 1
            question = para["qas"][0]["question"]
            best = None
            for k in range(1, len(para["sentences"]) + 1):
                text = PROMPT.format(passage=" ".join(para["sentences"][:k]), question=question)
                ids = tokenizer(text)["input_ids"]
                if len(ids) > max_tokens:
                    break
                best = ids
            if best is not None and len(best) >= min_tokens:
                out.append((lang, best))
                break
        else:
            raise SystemExit(f"{lang}: no paragraph gives a prompt of {min_tokens}..{max_tokens} tokens")
    return out


def agreement(a, b) -> tuple[int, list[str]]:
    """Rows equal token for token, and where the others first differ."""
    same, notes = 0, []
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        differ = [i for i in range(len(x)) if x[i] != y[i]]
        if differ:
            notes.append(f"row {row} from token {differ[0]}")
        else:
            same += 1
    return same, notes


def load_gemma():
    """Ours and transformers' Gemma-3-270M from the packaged GGUF (tests/test_gemma.py checks they are equal)."""
    import torch
    import transformers

    from umr_jax.models import gemma_weights

    path = gemma_weights.default_gguf_path()
    config, weights = gemma_weights.read_gguf(path)
    model = gemma_weights.build_gemma(config, random_init=False)
    gemma_weights.load_hf_weights(model, weights, path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    return model, gemma_weights.load_gguf_tokenizer(path), ref, config


def random_mt5():
    """A seeded random mT5-small-shaped model (untied head, as mT5), ours loaded from transformers' weights."""
    import torch
    import transformers

    from umr_jax.models import t5_weights
    from umr_jax.models.hf_checkpoint import default_e5_tokenizer_file, load_tokenizer
    from umr_jax.models.t5 import T5Config

    shape = dict(vocab_size=250_112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
                 num_heads=6, tie_word_embeddings=False)
    torch.manual_seed(_SEED.value)
    ref = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**shape)).eval()
    ref.lm_head.weight = torch.nn.Parameter(torch.randn_like(ref.shared.weight) * 0.05)
    config = T5Config(**shape)
    model = t5_weights.build_mt5(config, random_init=False)
    t5_weights.load_hf_weights(model, {k: v.detach().numpy() for k, v in ref.state_dict().items()}, "random mT5")
    return model, load_tokenizer(default_e5_tokenizer_file()), ref, config


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from umr_jax import generate as gen
    from umr_jax import sharding
    from umr_jax.batching import pad_rows

    torch.set_num_threads(os.cpu_count() or 1)
    batch_size, new_tokens, beams = _BATCH.value, _NEW.value, _BEAMS.value
    print(f"machine: {machine('float32 on both sides')}", flush=True)
    print(f"jax {jax.__version__} ({jax.device_count()} CPU devices, XLA_FLAGS {os.environ.get('XLA_FLAGS')}); "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; transformers "
          f"{transformers.__version__}", flush=True)

    # --- the model, the same weights on both sides ---
    start = time.perf_counter()
    decoder_only = _MODEL.value == "gemma3"
    model, tokenizer, ref, config = load_gemma() if decoder_only else random_mt5()
    mesh = sharding.make_mesh(tuple(int(x) for x in _MESH.value))
    sharding.shard_module(model, mesh)
    print(f"{_MODEL.value}: both loaded in {time.perf_counter() - start:.1f}s; ours on mesh {dict(mesh.shape)}; "
          f"transformers {type(ref).__name__}, attention {ref.config._attn_implementation}", flush=True)

    # --- the prompts, batched the same way for both ---
    prompts = reader_prompts(tokenizer, _DATA.value, _NUM.value, _MIN_TOKENS.value, _MAX_TOKENS.value, _SEED.value)
    if any(_EOS.value in ids for _, ids in prompts):
        raise SystemExit(f"--eos_id {_EOS.value} occurs in a prompt; pick another")
    lengths = [len(ids) for _, ids in prompts]
    batches = [prompts[s:s + batch_size] for s in range(0, len(prompts), batch_size)]
    if len(batches[-1]) < batch_size:  # one shape for ours: pad the last batch with copies, count real rows only
        batches[-1] = batches[-1] + [batches[-1][-1]] * (batch_size - len(batches[-1]))
    real_rows = len(prompts)
    print(f"{len(prompts)} prompts ({', '.join(sorted({lang for lang, _ in prompts}))}), {np.mean(lengths):.0f} "
          f"tokens on average ({min(lengths)}..{max(lengths)}); {len(batches)} batches of {batch_size}, padded to "
          f"each batch's longest (ours: on the right, to a multiple of 8; transformers: on the "
          f"{'left' if decoder_only else 'right'}); "
          f"{new_tokens} new tokens per row, {'greedy' if beams == 1 else f'beam search, {beams} beams'}; "
          f"eos id {_EOS.value} "
          f"({tokenizer.convert_ids_to_tokens(_EOS.value)})", flush=True)

    ours_inputs = []
    for batch in batches:
        width = -(-max(len(x) for _, x in batch) // 8) * 8
        ids, mask = pad_rows([x for _, x in batch], len(batch), width, int(config.pad_token_id))
        ours_inputs.append((ids, mask))
    hf_inputs = []
    for batch in batches:  # a decoder-only LM continues on the right: its prompts are padded on the left
        longest = max(len(x) for _, x in batch)
        ids = torch.full((len(batch), longest), int(config.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (_, x) in enumerate(batch):
            cols = slice(longest - len(x), longest) if decoder_only else slice(0, len(x))
            ids[row, cols] = torch.tensor(x)
            mask[row, cols] = 1
        hf_inputs.append((ids, mask))

    def search_settings(max_new: int):
        return gen.SearchSettings(max_new_tokens=max_new, eos_ids=(_EOS.value,), pad_id=int(config.pad_token_id),
                                  num_beams=beams)

    state = nnx.split(model)[1]
    programs = {}

    def ours(max_new: int) -> list[np.ndarray]:
        if max_new not in programs:
            programs[max_new] = gen.compile_generate(model, search_settings(max_new), mesh)
        program = programs[max_new]
        return [np.asarray(program(state, *sharding.shard_batch((ids, mask), mesh)).tokens)
                for ids, mask in ours_inputs]

    def hf(max_new: int, only_first: bool = False) -> list[np.ndarray]:
        out = []
        with torch.inference_mode():
            for ids, mask in hf_inputs[:1] if only_first else hf_inputs:
                seqs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                    num_beams=beams, use_cache=True, eos_token_id=[_EOS.value],
                                    pad_token_id=int(config.pad_token_id), length_penalty=1.0,
                                    early_stopping=False, top_k=None, top_p=None)
                out.append(seqs[:, ids.shape[1] if decoder_only else 1:].numpy())
        return out

    def timed(max_new: int, label: str) -> dict:
        start = time.perf_counter()
        ours(max_new)  # compiles one program per batch width
        first = time.perf_counter() - start
        start = time.perf_counter()
        hf(max_new, only_first=True)
        hf_warm = time.perf_counter() - start
        print(f"[{label}] warm-up: ours first call (compilation + all batches) {first:.1f}s; transformers first "
              f"call {hf_warm:.1f}s", flush=True)
        t_ours, t_hf, box = [], [], {}
        for r in range(_REPEATS.value):
            load = ForeignLoad()
            t_ours.append(best_time(lambda: box.__setitem__("ours", ours(max_new)), 1))
            t_hf.append(best_time(lambda: box.__setitem__("hf", hf(max_new)), 1))
            print(f"[{label}] round {r + 1}: ours {t_ours[-1]:.2f}s, transformers {t_hf[-1]:.2f}s for "
                  f"{len(batches)} batches; other processes kept {load.cores():.1f} of {os.cpu_count()} cores "
                  "busy meanwhile", flush=True)
        return dict(ours=min(t_ours), hf=min(t_hf), compile=first - min(t_ours),
                    ours_tokens=np.concatenate(box["ours"])[:real_rows],
                    hf_tokens=np.concatenate(box["hf"])[:real_rows])

    main_run = timed(new_tokens, f"{new_tokens} new tokens")
    rows, n_batches = len(batches) * batch_size, len(batches)
    ours_rate = rows * new_tokens / main_run["ours"]
    hf_rate = rows * new_tokens / main_run["hf"]

    a, b = main_run["ours_tokens"], main_run["hf_tokens"]
    if a.shape != b.shape:
        raise SystemExit(f"shapes differ: ours {a.shape}, transformers {b.shape} (did an end-of-sequence occur?)")
    if (a == _EOS.value).any() or (b == _EOS.value).any():
        print(f"WARNING: eos id {_EOS.value} was generated; rows after it are padding on both sides")
    same, notes = agreement(a, b)
    print(f"sample (row 0, {prompts[0][0]}): ours {tokenizer.decode(a[0])!r}")
    if same < len(a):
        print(f"          transformers {tokenizer.decode(b[0])!r}")
    print(f"agreement: {same}/{len(a)} rows identical token for token"
          + (f" ({'; '.join(notes)})" if notes else ""))
    print(f"ours: {ours_rate:.1f} new tokens/s, {main_run['ours'] / n_batches:.2f}s per batch of {batch_size} "
          f"(prompt + {new_tokens} tokens); compilation about {main_run['compile']:.1f}s")
    print(f"transformers: {hf_rate:.1f} new tokens/s, {main_run['hf'] / n_batches:.2f}s per batch of {batch_size}")

    if _BREAKDOWN.value and new_tokens > 1:
        one = timed(1, "1 new token")
        for name, label in (("ours", "ours"), ("hf", "transformers")):
            prefill = one[name] / n_batches
            step = (main_run[name] - one[name]) / n_batches / (new_tokens - 1)
            print(f"breakdown {label}: prefill + first token {prefill:.2f}s per batch, then {step * 1000:.1f} ms "
                  f"per decode step ({batch_size / step:.1f} tokens/s in decode)")
        print(f"breakdown ours: compilation at 1 new token about {one['compile']:.1f}s")

    print(f"generate_speedup_vs_pytorch: {ours_rate / hf_rate:.2f}")


if __name__ == "__main__":
    app.run(main)
