"""Gemma's tokenizer built from the GGUF metadata without torch, against transformers' ``gguf_file=`` tokenizer.

transformers' GGUF path imports torch to read the file; ours reads it with the
``gguf`` package. The reference (torch is installed in the test environment)
must give the same ids, with and without BOS, and the same decoded text on
XQuAD-R questions and passages in all 11 languages, the teacher's prompt
forms and whitespace, digit, emoji and control-token edge cases.
"""

import json
import os
import re
import time

import gguf
import pytest
import transformers

from umr_jax import teacher
from umr_jax.data.languages import language_name
from umr_jax.models import gemma_weights
from umr_jax.models.state_dict import CheckpointError

XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
EDGE_CASES = [
    "", " ", "  ", "   leading spaces", "trailing spaces   ", "  both  ", "two  inner   runs    of spaces",
    "line one\nline two", "\n\nstarts with newlines", "ends with newlines\n\n\n", "tab\tseparated\tvalues",
    "mixed \n \n  whitespace\t \n", "\r\nwindows line\r\n",
    "1234567890", "3.14159 and 2,718 and 1e-9", "year 2026, 12:30, +49 30 1234567", "٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९",
    "emoji 😀👍🏽🇩🇪 and 👨‍👩‍👧‍👦 family", "🤖", "a\u200bzero width", "combining e\u0301 vs é",
    "<start_of_turn>user\nHi<end_of_turn>", "<bos>literal bos in text", "[multimodal] <unused0> <mask>",
    "Question: Wie viele Punkte gab die Verteidigung der Panthers ab?",
    "Passage: Title Some text. Please write a question based on this passage in English.",
    "\u2581visible space marks\u2581\u2581", "byte fallback \x00\x07 \U0001d49c \U000e0041",
]


def xquad_texts(directory) -> list[str]:
    """~200 texts: per language 9 questions and 9 passage sentences (the teacher scores both kinds)."""
    texts = []
    for lang in XQUAD_LANGUAGES:
        with open(directory / f"{lang}.json", encoding="utf-8") as f:
            paragraphs = [p for article in json.load(f)["data"] for p in article["paragraphs"]]
        texts += [qa["question"] for p in paragraphs[:9] for qa in p["qas"][:1]]
        sentences = [s for p in paragraphs[9:40] for s in re.split(r"(?<=[.!?。।])\s*", p["context"]) if s]
        texts += sentences[::3][:9]
    return texts


def teacher_prompts(questions: list[str], passages: list[str]) -> list[str]:
    """The prompt and ' Question: ...' target texts the Gemma teacher tokenizes (teacher.py's default config)."""
    cfg = teacher.default_config()
    out = []
    for i, (question, passage) in enumerate(zip(questions, passages, strict=True)):
        lang = XQUAD_LANGUAGES[i % len(XQUAD_LANGUAGES)]
        out.append(cfg.input_template.format(title="Title", text=passage, language=language_name(lang)))
        out.append(cfg.input_template.replace("{title} ", "").format(text=passage, language=language_name(lang)))
        out.append(cfg.separator + cfg.target_template.format(query=question))
    return out


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return gemma_weights.default_gguf_path()


@pytest.fixture(scope="module")
def built(gguf_path, tmp_path_factory):
    """Ours, built from the GGUF into an empty cache (the build path runs), then loaded back from the cache."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("UMR_CACHE_DIR")
    os.environ["UMR_CACHE_DIR"] = str(cache)
    try:
        start = time.perf_counter()
        first = gemma_weights.load_gguf_tokenizer(gguf_path)
        build = time.perf_counter() - start
        start = time.perf_counter()
        again = gemma_weights.load_gguf_tokenizer(gguf_path)
        load = time.perf_counter() - start
    finally:
        if old is None:
            del os.environ["UMR_CACHE_DIR"]
        else:
            os.environ["UMR_CACHE_DIR"] = old
    print(f"\nGGUF tokenizer: build (read + merges + save + load) {build:.1f}s, cached load {load:.1f}s")
    return first, again, sorted(os.listdir(cache))


@pytest.fixture(scope="module")
def reference(gguf_path):
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                           gguf_file=os.path.basename(gguf_path))
    print(f"\ntransformers gguf_file= tokenizer {time.perf_counter() - start:.1f}s")
    return tokenizer


@pytest.mark.slow
def test_ids_and_decoding_equal_transformers_gguf_tokenizer(built, reference, shared_data):
    ours, again, cached = built
    assert len(cached) == 1 and cached[0].endswith(".tokenizer")  # built once, then reused
    texts = xquad_texts(shared_data / "xquad-r")
    assert len(texts) == 11 * 18 and sum(t.isascii() for t in texts) < len(texts) // 4
    texts += teacher_prompts(texts[0::18][:11], texts[9::18][:11]) + EDGE_CASES
    for specials in (True, False):
        expected = reference(texts, add_special_tokens=specials)["input_ids"]
        for tokenizer in (ours, again):
            got = tokenizer(texts, add_special_tokens=specials)["input_ids"]
            for text, a, b in zip(texts, got, expected, strict=True):
                assert a == b, (specials, text)
    with_bos = ours(texts)["input_ids"]
    assert with_bos == [[2, *ids] for ids in ours(texts, add_special_tokens=False)["input_ids"]]  # BOS only
    assert ours(["\n\n"], add_special_tokens=False)["input_ids"] == [[108]]  # a newline run stays one token
    for ids in with_bos:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    # Decoding is lossless but for SentencePiece's own space mark, which reads back as a space.
    round_trip = [ours.decode(ids) for ids in ours(texts, add_special_tokens=False)["input_ids"]]
    assert [t for t, back in zip(texts, round_trip, strict=True) if back != t] == [EDGE_CASES[-2]]
    for tokenizer in (ours, again):
        assert len(tokenizer) == len(reference) == 262_144
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (
            reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)
        assert set(tokenizer.all_special_ids) == set(reference.all_special_ids) == {0, 1, 2, 3, 4}
        assert tokenizer.convert_ids_to_tokens([138, 236743]) == reference.convert_ids_to_tokens([138, 236743])


def test_merges_follow_vocabulary_order_longest_left_first():
    # Known answer for a toy best-first vocabulary: "ab" before "abc", every two-token split of a token.
    tokens = ["<pad>", "a", "b", "c", "ab", "abc", "bc", "cab"]
    assert gemma_weights.merges_from_vocabulary(tokens) == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c"),
                                                             ("c", "ab")]  # not ("ca", "b"): "ca" is no token
    # A duplicate counts at its last position.
    assert gemma_weights.merges_from_vocabulary(["ab", "a", "b", "ab"]) == [("a", "b")]


def _tiny_tokenizer_gguf(path, arch: str = "gemma3", model: str = "llama") -> None:
    """A GGUF with only tokenizer metadata (the tokenizer needs no tensors)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(model)
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n", "  ", "h", "i", "▁", "hi", "▁hi"]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 3, 3, 4, 4, 1, 1, 1, 1, 1])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_gguf_tokenizer_known_ids(tmp_path):
    _tiny_tokenizer_gguf(tmp_path / "tiny.gguf")
    tokenizer = gemma_weights.build_gguf_tokenizer(str(tmp_path / "tiny.gguf"))
    # BOS and EOS as the file's flags say; merges in vocabulary order: (▁ ▁), (h i), (▁ hi).
    assert tokenizer("hi hi")["input_ids"] == [2, 10, 11, 1]
    # "\n" and the control token stay whole; the stored "  " is the piece "▁▁" (id 6), reached by the merges.
    assert tokenizer("hi\n  hi<start_of_turn>", add_special_tokens=False)["input_ids"] == [10, 5, 6, 10, 4]
    assert tokenizer.decode([2, 10, 5, 6, 10, 4, 1], skip_special_tokens=True) == "hi\n  hi"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 1, 0)


def test_read_gguf_hands_its_vocabulary_to_the_tokenizer_build(tmp_path, monkeypatch):
    monkeypatch.setenv("UMR_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tmp_path / "tiny.gguf")
    _tiny_tokenizer_gguf(path)
    with pytest.raises(CheckpointError, match="block_count"):  # no model in it, but its vocabulary was read
        gemma_weights.read_gguf(path)

    def parse_again(path):
        raise RuntimeError("the GGUF metadata was parsed a second time")

    monkeypatch.setattr(gemma_weights, "_open_gguf", parse_again)
    assert gemma_weights.build_gguf_tokenizer(path)("hi")["input_ids"] == [2, 10, 1]
    with pytest.raises(RuntimeError, match="second time"):  # handed over once, not kept
        gemma_weights.build_gguf_tokenizer(path)


@pytest.mark.parametrize(("arch", "model"), [("llama", "llama"), ("gemma3", "gpt2")])
def test_other_tokenizers_are_refused(tmp_path, arch, model):
    _tiny_tokenizer_gguf(tmp_path / "other.gguf", arch, model)
    with pytest.raises(CheckpointError, match=r"only Gemma's SentencePiece tokenizer"):
        gemma_weights.build_gguf_tokenizer(str(tmp_path / "other.gguf"))


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "a"])
    writer.add_bos_token_id(7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"bos_token_id 7 is outside the 2-token vocabulary"):
        gemma_weights.read_gguf_vocabulary(str(path))
