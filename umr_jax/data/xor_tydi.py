"""TFDS builder for the XOR-TyDi QA v1.1 questions and answers (array_record, no TensorFlow).

Configs and splits (counts of the official v1.1 files):
  * `retrieve`: XOR-Retrieve, answers are English spans. `train` 15,250, `dev` 2,110.
  * `full`: XOR-Full, answers are in the question's language. `dev` 3,473.

Only questions and answers are built: the passage collections (13 GB English
Wikipedia, 29 GB multilingual) are out of reach here, see the data SOURCE.md.

Each example is {id, question, answers, lang}; `lang` is normalised (the train
file spells Arabic " ar"). Examples are stored sorted by (lang, id) so every
build gives the same order. A bad row (malformed JSON, missing or mistyped
field, empty question, unknown language, duplicate id, wrong split) stops the
build with the file name and line number: silently skipping rows would shift
the evaluation numbers without anyone noticing.

The data also holds same-text questions under different ids (train 111 extra
rows, dev 4, full dev 6) and 30 retrieve-dev / 33 full-dev question texts that
also occur in train; they are official rows and are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from umr_jax.data import sources
from umr_jax.data.languages import normalize_language_code

LOCAL_DIR_ENV = "UMR_XOR_TYDI_DIR"
BASE_URL = "https://nlp.cs.washington.edu/xorqa/XORQA_site/data/"
LANGUAGES = ("ar", "bn", "fi", "ja", "ko", "ru", "te")

# config -> split -> official file name
FILES: dict[str, dict[str, str]] = {
    "retrieve": {
        "train": "xor_train_retrieve_eng_span.jsonl",
        "dev": "xor_dev_retrieve_eng_span_v1_1.jsonl",
    },
    "full": {"dev": "xor_dev_full_v1_1.jsonl"},
}

_DESCRIPTION = "XOR-TyDi QA v1.1 questions (7 languages) with their answers; no passage collection."
_CITATION = """\
@inproceedings{xorqa,
  title={{XOR} {QA}: Cross-lingual Open-Retrieval Question Answering},
  author={Akari Asai and Jungo Kasai and Jonathan H. Clark and Kenton Lee and Eunsol Choi and Hannaneh Hajishirzi},
  booktitle={NAACL-HLT}, year={2021}}
"""


@dataclasses.dataclass(frozen=True)
class XorTydiQuestion:
    """One XOR-TyDi question; `answers` are English spans (retrieve) or in `lang` (full)."""

    id: str
    question: str
    answers: tuple[str, ...]
    lang: str


def official_file(name: str) -> sources.OfficialFile:
    return sources.OfficialFile(name=name, url=BASE_URL + name)


def _field(row: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{where}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}")
    return value


def read_questions(path: str | os.PathLike[str], *, name: str, split: str) -> list[XorTydiQuestion]:
    """Parses and validates one official jsonl file, sorted by (lang, id).

    `name` is the official file name used in errors (a download is stored under
    a hashed name); `split` is the split every row must declare.
    """
    questions: list[XorTydiQuestion] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{name} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            qid = _field(row, "id", str, where)
            question = _field(row, "question", str, where)
            answers = _field(row, "answers", list, where)
            lang = normalize_language_code(_field(row, "lang", str, where), source=where)
            row_split = _field(row, "split", str, where)
            if not qid:
                raise ValueError(f"{where}: empty id")
            if not question.strip():
                raise ValueError(f"{where}: empty question (id {qid})")
            if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
                raise ValueError(f"{where}: answers must be a non-empty list of non-empty strings (id {qid})")
            if row_split != split:
                raise ValueError(f"{where}: row says split {row_split!r}, the file holds {split!r} (id {qid})")
            if qid in first_line:
                raise ValueError(f"{where}: duplicate id {qid} (first seen on line {first_line[qid]})")
            first_line[qid] = line_no
            questions.append(XorTydiQuestion(id=qid, question=question, answers=tuple(answers), lang=lang))
    if not questions:
        raise ValueError(f"{name}: no rows")
    return sorted(questions, key=lambda q: (q.lang, q.id))


class XorTydiBuilder(sources.OfficialFilesBuilder):
    """XOR-TyDi QA v1.1 questions with their answers."""

    name = "xor_tydi"
    LOCAL_DIR_ENV = LOCAL_DIR_ENV
    HOMEPAGE, LICENSE = "https://nlp.cs.washington.edu/xorqa/", "MIT"
    DESCRIPTION, CITATION = _DESCRIPTION, _CITATION
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.1.0": "Official v1.1 files: retrieve train/dev, full dev."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="retrieve", description="XOR-Retrieve: English answer spans; train and dev."),
        tfds.core.BuilderConfig(name="full", description="XOR-Full: answers in the question language; dev."),
    ]

    def features(self) -> dict[str, Any]:
        text = tfds.features.Text()
        return {"id": text, "question": text, "answers": tfds.features.Sequence(text), "lang": text}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        generators = {}
        for split, name in FILES[self.builder_config.name].items():
            file = official_file(name)
            path = self.resolve(dl_manager, file)
            generators[split] = self._generate_examples(path, name=name, split=split)
        return generators

    def _generate_examples(self, path: Path, *, name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for q in read_questions(path, name=name, split=split):
            yield q.id, {"id": q.id, "question": q.question, "answers": list(q.answers), "lang": q.lang}


def load_xor_tydi(
    config: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
) -> list[XorTydiQuestion]:
    """Questions of one XOR-TyDi config ("retrieve" or "full") and split, sorted by (lang, id).

    Prepares the TFDS dataset on first use (in `data_dir`, else $UMR_TFDS_DIR,
    else ~/tensorflow_datasets) from local copies in `local_dir` (else
    $UMR_XOR_TYDI_DIR) or the official URLs, then reads it without TensorFlow.
    """
    if config not in FILES:
        raise ValueError(f"unknown XOR-TyDi config {config!r}; choose from {sorted(FILES)}")
    if split not in FILES[config]:
        raise ValueError(f"XOR-TyDi {config!r} has no split {split!r}; it has {sorted(FILES[config])}")
    builder = XorTydiBuilder(config=config, data_dir=sources.tfds_data_dir(data_dir), local_dir=local_dir)
    builder.download_and_prepare()
    return [
        XorTydiQuestion(id=r["id"], question=r["question"], answers=tuple(r["answers"]), lang=r["lang"])
        for r in sources.read_split(builder, split)
    ]
