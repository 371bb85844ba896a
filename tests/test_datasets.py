"""TFDS builders for XOR-TyDi QA and XQuAD-R, built once per session from ../shared/data.

Counts come from the SOURCE.md files beside the data; network access is never
attempted (the offline tests replace the connectivity probe).
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

import pytest
import requests

from umr_jax.data import languages, sources, xor_tydi, xquad_r

XOR_COUNTS = {
    ("retrieve", "train"): {"bn": 2582, "ar": 2574, "ko": 2469, "ja": 2288, "fi": 2088, "ru": 1941, "te": 1308},
    ("retrieve", "dev"): {"ar": 350, "bn": 312, "fi": 360, "ja": 296, "ko": 299, "ru": 255, "te": 238},
    ("full", "dev"): {"ar": 708, "fi": 615, "ru": 568, "ja": 433, "bn": 427, "ko": 371, "te": 351},
}
XQUAD_CANDIDATES = {
    "ar": 1222, "de": 1276, "el": 1234, "en": 1180, "es": 1215, "hi": 1244,
    "ru": 1219, "th": 852, "tr": 1167, "vi": 1209, "zh": 1196,
}  # fmt: skip


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def xor(shared_data: pathlib.Path, tfds_dir: pathlib.Path) -> dict[tuple[str, str], list[xor_tydi.XorTydiQuestion]]:
    local = shared_data / "xor-tydi"
    return {key: xor_tydi.load_xor_tydi(*key, data_dir=tfds_dir, local_dir=local) for key in XOR_COUNTS}


@pytest.fixture(scope="session")
def xquad(shared_data: pathlib.Path, tfds_dir: pathlib.Path) -> xquad_r.XquadR:
    return xquad_r.load_xquad_r(data_dir=tfds_dir, local_dir=shared_data / "xquad-r")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, and no local directory from the environment."""

    def refuse(url: str, timeout: float = 0.0) -> None:
        raise requests.ConnectionError(f"network disabled in tests ({url})")

    monkeypatch.setattr(sources, "probe_url", refuse)
    monkeypatch.delenv(xor_tydi.LOCAL_DIR_ENV, raising=False)
    monkeypatch.delenv(xquad_r.LOCAL_DIR_ENV, raising=False)


# --- XOR-TyDi ---------------------------------------------------------------


@pytest.mark.parametrize("key", list(XOR_COUNTS), ids=lambda k: "/".join(k))
def test_xor_counts_per_language(xor, key):
    questions = xor[key]
    assert collections.Counter(q.lang for q in questions) == XOR_COUNTS[key]
    assert len(questions) == {("retrieve", "train"): 15250, ("retrieve", "dev"): 2110, ("full", "dev"): 3473}[key]


def test_xor_rows_are_sorted_unique_and_complete(xor):
    for questions in xor.values():
        assert [(q.lang, q.id) for q in questions] == sorted((q.lang, q.id) for q in questions)
        assert len({q.id for q in questions}) == len(questions)
        assert all(q.question.strip() and q.answers and all(q.answers) for q in questions)


def test_xor_arabic_train_code_is_normalised(xor):
    # the train file writes " ar"; it must come out as "ar" like the dev files
    assert {q.lang for q in xor["retrieve", "train"]} == set(xor_tydi.LANGUAGES)
    by_id = {q.id: q for q in xor["retrieve", "train"]}
    known = by_id["-2745676532874802308"]
    assert (known.lang, known.answers) == ("bn", ("2006",))


def test_xor_retrieve_answers_are_english_full_answers_are_not(xor):
    assert sum(q.answers[0].isascii() for q in xor["retrieve", "dev"]) > 0.9 * 2110
    arabic_full = [q for q in xor["full", "dev"] if q.lang == "ar"]
    assert sum(not q.answers[0].isascii() for q in arabic_full) > 0.5 * len(arabic_full)


def test_xor_config_and_split_are_checked(tfds_dir):
    with pytest.raises(ValueError, match="no split 'train'"):
        xor_tydi.load_xor_tydi("full", "train", data_dir=tfds_dir)
    with pytest.raises(ValueError, match="unknown XOR-TyDi config"):
        xor_tydi.load_xor_tydi("gold", "dev", data_dir=tfds_dir)


def _row(**overrides: object) -> str:
    row = {"id": "1", "question": "Ni nini?", "answers": ["x"], "lang": "ar", "split": "dev"} | overrides
    return json.dumps({k: v for k, v in row.items() if v is not None})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "2", "question": ', "malformed JSON"),
        (_row(id="2", question=None), "missing field 'question'"),
        (_row(id="2", question="  "), "empty question"),
        (_row(id="1"), "duplicate id 1 \\(first seen on line 1\\)"),
        (_row(id="2", lang="xx"), "unknown language code 'xx'; supported codes: af, am, ar"),
        (_row(id="2", answers=[]), "answers must be a non-empty list"),
        (_row(id="2", split="train"), "row says split 'train'"),
    ],
)
def test_xor_bad_row_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "xor_dev_full_v1_1.jsonl"
    path.write_text(_row() + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^xor_dev_full_v1_1.jsonl line 2: .*{message}"):
        xor_tydi.read_questions(path, name="xor_dev_full_v1_1.jsonl", split="dev")


# --- XQuAD-R ----------------------------------------------------------------


def test_xquad_counts_per_language(xquad):
    assert collections.Counter(q.lang for q in xquad.questions) == {lang: 1190 for lang in xquad_r.LANGUAGES}
    assert len(xquad.questions) == 13090
    assert collections.Counter(c.lang for c in xquad.candidates) == XQUAD_CANDIDATES
    assert len(xquad.candidates) == 13014
    assert len({c.id for c in xquad.candidates}) == 13014
    assert len({q.id for q in xquad.questions}) == 13090


def test_xquad_every_question_has_one_relevant_sentence_per_language(xquad):
    candidate_ids = {c.id for c in xquad.candidates}
    relevant_by_qid = collections.defaultdict(set)
    for q in xquad.questions:
        assert len(q.relevant) == 11
        assert [r.split(":")[0] for r in q.relevant] == list(xquad_r.LANGUAGES)
        assert set(q.relevant) <= candidate_ids
        relevant_by_qid[q.qid].add(q.relevant)
    # the 11 translations of a question share one relevant set
    assert len(relevant_by_qid) == 1190
    assert all(len(sets) == 1 for sets in relevant_by_qid.values())


def test_xquad_known_answer(xquad):
    candidates = {c.id: c for c in xquad.candidates}
    (question,) = [q for q in xquad.questions if q.question == "How many points did the Panthers defense surrender?"]
    assert question.id == f"en:{question.qid}"
    english = candidates[question.relevant[xquad_r.LANGUAGES.index("en")]]
    assert "308 points" in english.sentence
    assert english.sentence in english.context
    chinese = candidates[question.relevant[xquad_r.LANGUAGES.index("zh")]]
    assert "308" in chinese.sentence


def test_xquad_turkish_shifted_breaks_keep_their_answer_sentence(xquad):
    # tr.json article 9 paragraph 3 has mojibake in the context only, which shifts its last breaks by two
    candidates = {c.id: c for c in xquad.candidates}
    (question,) = [q for q in xquad.questions if q.id == "tr:570d47b8b3d812140066d631"]
    turkish = question.relevant[xquad_r.LANGUAGES.index("tr")]
    assert turkish == "tr:9:3:3"
    assert "beş hattın" in candidates[turkish].sentence


def _paragraph(answer_start: int) -> dict:
    return {
        "context": "One two. Three four.",
        "sentences": ["One two.", "Three four."],
        "sentence_breaks": [[0, 8], [9, 20]],
        "qas": [{"id": "q1", "question": "Which?", "answers": [{"text": "Three", "answer_start": answer_start}]}],
    }


def test_xquad_answer_sentence_and_bad_files(tmp_path):
    path = tmp_path / "en.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [_paragraph(9)]}]}), encoding="utf-8")
    parsed = xquad_r.read_language_file(path, lang="en", name="en.json")
    assert parsed.questions == {"q1": ("Which?", "en:0:0:1")}
    assert [c.id for c in parsed.candidates] == ["en:0:0:0", "en:0:0:1"]

    bad = _paragraph(9)
    bad["context"] = "One two.  Three four."  # answer now starts in the gap between sentences
    bad["qas"][0]["answers"][0]["answer_start"] = 8
    bad["qas"][0]["answers"][0]["text"] = " "
    path.write_text(json.dumps({"data": [{"paragraphs": [bad]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"^en.json data\[0\].paragraphs\[0\].qas\[0\]: answer start 8 lies outside"):
        xquad_r.read_language_file(path, lang="en", name="en.json")

    path.write_text(json.dumps({"data": [{"paragraphs": [_paragraph(3)]}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="is not the context text at offset 3"):
        xquad_r.read_language_file(path, lang="en", name="en.json")


def test_xquad_question_missing_in_one_language_is_an_error(tmp_path):
    files = {}
    for lang, qid in (("en", "q1"), ("de", "q2")):
        paragraph = _paragraph(9)
        paragraph["qas"][0]["id"] = qid
        path = tmp_path / f"{lang}.json"
        path.write_text(json.dumps({"data": [{"paragraphs": [paragraph]}]}), encoding="utf-8")
        files[lang] = xquad_r.read_language_file(path, lang=lang, name=f"{lang}.json")
    with pytest.raises(ValueError, match=r"de\.json and en\.json hold different questions: 1 missing"):
        xquad_r.link_questions(files)


# --- sources: local copies, downloads, checksums ----------------------------


def test_checksums_are_registered_with_tfds(shared_data):
    xor_infos = xor_tydi.XorTydiBuilder.url_infos
    for name in (
        "xor_train_retrieve_eng_span.jsonl",
        "xor_dev_retrieve_eng_span_v1_1.jsonl",
        "xor_dev_full_v1_1.jsonl",
    ):
        file = xor_tydi.official_file(name)
        assert sources.registered_sha256(xor_infos, file.url) == sources.file_sha256(shared_data / "xor-tydi" / name)
    xquad_infos = xquad_r.XquadRBuilder.url_infos
    for lang in xquad_r.LANGUAGES:
        file = xquad_r.official_file(lang)
        assert sources.registered_sha256(xquad_infos, file.url) == sources.file_sha256(
            shared_data / "xquad-r" / file.name
        )


def test_offline_without_local_copy_names_file_url_and_setting(tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(sources.DataUnavailableError) as err:
        xor_tydi.load_xor_tydi("full", "dev", data_dir=tmp_path / "tfds", local_dir=empty)
    message = str(err.value)
    assert f"xor_dev_full_v1_1.jsonl not found in {empty}" in message
    assert (
        "https://nlp.cs.washington.edu/xorqa/XORQA_site/data/xor_dev_full_v1_1.jsonl could not be downloaded" in message
    )
    assert "network disabled in tests" in message
    assert "UMR_XOR_TYDI_DIR" in message and "local_dir=" in message


def test_offline_without_any_local_directory(tmp_path, offline):
    with pytest.raises(sources.DataUnavailableError, match=r"ar.json has no local copy \(neither local_dir= nor UMR_X"):
        xquad_r.load_xquad_r(data_dir=tmp_path / "tfds")


def test_environment_variable_points_at_local_copies(monkeypatch, tmp_path):
    (tmp_path / "from-env").mkdir()
    (tmp_path / "arg").mkdir()
    monkeypatch.setenv(xquad_r.LOCAL_DIR_ENV, str(tmp_path / "from-env"))
    assert sources.local_directory(None, xquad_r.LOCAL_DIR_ENV) == tmp_path / "from-env"
    assert sources.local_directory(tmp_path / "arg", xquad_r.LOCAL_DIR_ENV) == tmp_path / "arg"
    monkeypatch.delenv(xquad_r.LOCAL_DIR_ENV)
    assert sources.local_directory(None, xquad_r.LOCAL_DIR_ENV) is None
    monkeypatch.setenv(sources.TFDS_DIR_ENV, str(tmp_path / "tfds"))
    assert sources.tfds_data_dir(None) == str(tmp_path / "tfds")


def test_a_named_local_directory_must_exist_even_when_the_data_is_prepared(monkeypatch, tmp_path, shared_data):
    # Prepared once from the real files; a later typo in local_dir must not be ignored because TFDS has the data.
    xquad_r.load_xquad_r(data_dir=tmp_path / "tfds", local_dir=shared_data / "xquad-r")
    with pytest.raises(FileNotFoundError, match=r"local_dir=/nonexistent: no such directory"):
        xquad_r.load_xquad_r(data_dir=tmp_path / "tfds", local_dir="/nonexistent")
    monkeypatch.setenv(xquad_r.LOCAL_DIR_ENV, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=rf"{xquad_r.LOCAL_DIR_ENV}=.*typo: no such directory"):
        xquad_r.load_xquad_r(data_dir=tmp_path / "tfds")


def test_local_copy_with_wrong_checksum_is_rejected(tmp_path, shared_data, offline):
    local = tmp_path / "copy"
    local.mkdir()
    original = (shared_data / "xor-tydi" / "xor_dev_full_v1_1.jsonl").read_text(encoding="utf-8")
    (local / "xor_dev_full_v1_1.jsonl").write_text(original.replace('"ar"', '"fi"', 1), encoding="utf-8")
    with pytest.raises(
        sources.ChecksumMismatchError, match=r"xor_dev_full_v1_1.jsonl: .* has sha256 [0-9a-f]{64}, but"
    ):
        xor_tydi.load_xor_tydi("full", "dev", data_dir=tmp_path / "tfds", local_dir=local)


def test_downloads_are_used_and_checked(tmp_path, shared_data):
    file = xor_tydi.official_file("xor_dev_full_v1_1.jsonl")
    expected = sources.file_sha256(shared_data / "xor-tydi" / file.name)
    downloaded = sources.resolve_file(
        file, local_dir=None, env_var="X", sha256=expected, download=lambda url: shared_data / "xor-tydi" / file.name
    )
    assert downloaded == shared_data / "xor-tydi" / file.name
    wrong = tmp_path / "download"
    wrong.write_text("{}\n")
    with pytest.raises(sources.ChecksumMismatchError, match=r"official file https://nlp\.cs\.washington\.edu"):
        sources.resolve_file(file, local_dir=None, env_var="X", sha256=expected, download=lambda url: wrong)


# --- languages and the no-TensorFlow promise ---------------------------------


def test_language_codes_and_names():
    assert languages.normalize_language_code(" ar") == "ar"
    assert languages.normalize_language_code("ZH\n") == "zh"
    assert languages.normalize_language_code("zh-Hant") == "zh"
    assert languages.normalize_language_code("pt_BR") == "pt"
    with pytest.raises(ValueError, match=r"^f.jsonl line 3: unknown language code 'xx'; supported codes: af, am, ar, "):
        languages.normalize_language_code("xx", source="f.jsonl line 3")
    with pytest.raises(ValueError, match="empty language code '  '"):
        languages.normalize_language_code("  ")
    for code in (*xor_tydi.LANGUAGES, *xquad_r.LANGUAGES, "fr", "it", "pt", "id", "sw"):
        assert languages.language_name(code)
    assert languages.language_name("te") == "Telugu"
    with pytest.raises(ValueError, match="supported codes"):
        languages.language_name("klingon")


def test_no_tensorflow_needed(xor, xquad):
    assert "tensorflow" not in sys.modules
