"""TFDS builder for XQuAD-R, the LAReQA multilingual answer-retrieval benchmark (array_record, no TensorFlow).

XQuAD-R is XQuAD (1190 SQuAD v1.1 dev questions, professionally translated into
10 languages) cut into sentences: each paragraph carries `sentences` and
`sentence_breaks` ([start, end] character offsets into `context`). Retrieval is
LAReQA's "X-Y" task: every question (11 x 1190) searches the pool of all
sentences of all 11 languages, and its relevant candidates are the sentence that
contains the answer start in each language, so exactly 11 per question.

Configs, each with the single split `test` (the benchmark has no other split):
  * `questions`: 13,090 = 11 x 1190. id = "{lang}:{qid}"; `qid` is the SQuAD id,
    shared by the 11 translations; `relevant` = the 11 candidate ids, in the
    order of LANGUAGES.
  * `candidates`: 13,014 sentences. id = "{lang}:{article}:{paragraph}:{sentence}"
    (0-based positions in that language's file); `context` is the paragraph,
    which LAReQA encodes together with the sentence.
Both are stored in language order, then file order.

Quirks of the official files, handled on purpose rather than dropped:
  * 112 answers (2 to 20 per language) run past the end of the sentence that
    holds their start; the relevant sentence is still the one containing
    `answer_start`, LAReQA's definition.
  * tr.json article 9 paragraph 3: the context spells a fraction slash as three
    mojibake characters where `sentences` has one, so the last two breaks sit two
    characters early in the context. Candidates use the `sentences` text, and no
    answer start falls in the shifted two characters, so no assignment changes.
  * A few candidates share their text within a language (e.g. "[citation
    needed]" fragments in ar/hi/ru/zh); they are distinct candidates with
    distinct ids, as in the official pool.
  * The official sentence splitter cut some sentences at initials, so 14 answers
    lie in fragments of at most 12 characters ("The T. T.", "John W.",
    "I."); they stay the relevant candidates, as in LAReQA's evaluation.
  * 59 paragraphs (none in en) start with a U+FEFF byte-order mark, and so do
    their first sentences; the text is kept as published since the offsets count it.
Anything else irregular (an answer start outside every sentence, an answer that
is not the context text at its offset, a question missing from some language)
stops the build with the file and JSON position.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from umr_jax import evaluate, run_files
from umr_jax.data import sources
from umr_jax.data.readers import Passage

LOCAL_DIR_ENV = "UMR_XQUAD_R_DIR"
BASE_URL = "https://raw.githubusercontent.com/google-research-datasets/lareqa/master/xquad-r/"
LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
SPLIT = "test"

_DESCRIPTION = "XQuAD-R (LAReQA): 11-way parallel questions retrieving answer sentences from an 11-language pool."
_CITATION = """\
@article{roy2020lareqa,
  title={LAReQA: Language-agnostic answer retrieval from a multilingual pool},
  author={Roy, Uma and Constant, Noah and Al-Rfou, Rami and Barua, Aditya and Phillips, Aaron and Yang, Yinfei},
  journal={arXiv preprint arXiv:2004.05484}, year={2020}}
"""


@dataclasses.dataclass(frozen=True)
class XquadRQuestion:
    """A question in one language; `relevant` holds one candidate id per language."""

    id: str
    qid: str
    lang: str
    question: str
    relevant: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class XquadRCandidate:
    """One answer sentence of the pool, with the paragraph it comes from."""

    id: str
    lang: str
    sentence: str
    context: str


@dataclasses.dataclass(frozen=True)
class XquadR:
    """The whole benchmark: 13,090 questions and the 13,014-sentence pool they search."""

    questions: list[XquadRQuestion]
    candidates: list[XquadRCandidate]


@dataclasses.dataclass(frozen=True)
class LanguageFile:
    """One parsed language file: its candidates and, per question, the answer sentence's id."""

    lang: str
    candidates: list[XquadRCandidate]
    questions: dict[str, tuple[str, str]]  # qid -> (question text, answer candidate id), file order
    answers: dict[str, str] = dataclasses.field(default_factory=dict)  # qid -> the answer text


def official_file(lang: str) -> sources.OfficialFile:
    return sources.OfficialFile(name=f"{lang}.json", url=f"{BASE_URL}{lang}.json")


def _get(obj: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}.{key}: should be {kind.__name__}, got {type(value).__name__}")
    return value


def _breaks(paragraph: dict[str, Any], context: str, where: str) -> list[int]:
    """Validated sentence start offsets; sentences must be in order and inside the context."""
    sentences = _get(paragraph, "sentences", list, where)
    breaks = _get(paragraph, "sentence_breaks", list, where)
    if not sentences or len(sentences) != len(breaks):
        raise ValueError(f"{where}: {len(sentences)} sentences but {len(breaks)} sentence_breaks")
    starts: list[int] = []
    previous_end = 0
    for i, (sentence, span) in enumerate(zip(sentences, breaks, strict=True)):
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span)
        if not ok or not previous_end <= span[0] < span[1] <= len(context):
            raise ValueError(f"{where}.sentence_breaks[{i}]: {span!r} is not an in-order span of the context")
        if not isinstance(sentence, str) or not sentence.strip():
            raise ValueError(f"{where}.sentences[{i}]: empty or not text")
        starts.append(span[0])
        previous_end = span[1]
    return starts


def read_language_file(path: str | os.PathLike[str], *, lang: str, name: str) -> LanguageFile:
    """Parses one official `{lang}.json`, checking every field the benchmark depends on.

    `name` is the official file name used in errors (a download is stored under
    a hashed name).
    """
    try:
        with open(path, encoding="utf-8") as f:
            root = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name}: malformed JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    candidates: list[XquadRCandidate] = []
    questions: dict[str, tuple[str, str]] = {}
    answer_texts: dict[str, str] = {}
    for a, article in enumerate(_get(root, "data", list, name)):
        for p, paragraph in enumerate(_get(article, "paragraphs", list, f"{name} data[{a}]")):
            where = f"{name} data[{a}].paragraphs[{p}]"
            context = _get(paragraph, "context", str, where)
            starts = _breaks(paragraph, context, where)
            breaks = paragraph["sentence_breaks"]
            ids = [f"{lang}:{a}:{p}:{s}" for s in range(len(starts))]
            for s, sentence in enumerate(paragraph["sentences"]):
                candidates.append(XquadRCandidate(id=ids[s], lang=lang, sentence=sentence, context=context))
            for q, qa in enumerate(_get(paragraph, "qas", list, where)):
                qa_where = f"{where}.qas[{q}]"
                qid = _get(qa, "id", str, qa_where)
                question = _get(qa, "question", str, qa_where)
                answers = _get(qa, "answers", list, qa_where)
                if not question.strip():
                    raise ValueError(f"{qa_where}: empty question (id {qid})")
                if len(answers) != 1:
                    raise ValueError(f"{qa_where}: expected exactly one answer, got {len(answers)} (id {qid})")
                text = _get(answers[0], "text", str, f"{qa_where}.answers[0]")
                start = _get(answers[0], "answer_start", int, f"{qa_where}.answers[0]")
                if context[start : start + len(text)] != text:
                    raise ValueError(
                        f"{qa_where}: answer {text!r} is not the context text at offset {start} (id {qid})"
                    )
                s = bisect.bisect_right(starts, start) - 1
                if s < 0 or start >= breaks[s][1]:
                    raise ValueError(f"{qa_where}: answer start {start} lies outside every sentence (id {qid})")
                if qid in questions:
                    raise ValueError(f"{qa_where}: duplicate question id {qid}")
                questions[qid] = (question, ids[s])
                answer_texts[qid] = text
    if not questions:
        raise ValueError(f"{name}: no questions")
    return LanguageFile(lang=lang, candidates=candidates, questions=questions, answers=answer_texts)


def link_questions(files: Mapping[str, LanguageFile]) -> list[XquadRQuestion]:
    """Questions of all languages, each with its answer sentence in every language.

    The files must hold the same question ids: a question missing from one
    language would silently lose a relevant candidate, so it is an error.
    """
    langs = list(files)
    reference = set(files[langs[0]].questions)
    for lang in langs[1:]:
        ids = set(files[lang].questions)
        if ids != reference:
            missing, extra = sorted(reference - ids), sorted(ids - reference)
            raise ValueError(
                f"{lang}.json and {langs[0]}.json hold different questions: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]})"
            )
    linked = []
    for lang in langs:
        for qid, (question, _) in files[lang].questions.items():
            relevant = tuple(files[other].questions[qid][1] for other in langs)
            linked.append(XquadRQuestion(f"{lang}:{qid}", qid, lang, question, relevant))
    return linked


class XquadRBuilder(sources.OfficialFilesBuilder):
    """LAReQA XQuAD-R: the questions and the pooled answer-sentence candidates."""

    name = "xquad_r"
    LOCAL_DIR_ENV = LOCAL_DIR_ENV
    HOMEPAGE, LICENSE = "https://github.com/google-research-datasets/lareqa", "CC BY-SA 4.0"
    DESCRIPTION, CITATION = _DESCRIPTION, _CITATION
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "lareqa @ 9bc8c7fb (2020-05-19) xquad-r files."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="questions", description="11 x 1190 questions with their 11 relevant ids."),
        tfds.core.BuilderConfig(name="candidates", description="The 13,014 answer sentences of all 11 languages."),
    ]

    def features(self) -> dict[str, Any]:
        text = tfds.features.Text()
        if self.builder_config.name == "questions":
            return {"id": text, "qid": text, "lang": text, "question": text, "relevant": tfds.features.Sequence(text)}
        return {"id": text, "lang": text, "sentence": text, "context": text}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[Any]]:
        paths = {}
        for lang in LANGUAGES:
            file = official_file(lang)
            paths[lang] = self.resolve(dl_manager, file)
        return {SPLIT: self._generate_examples(paths)}

    def _generate_examples(self, paths: dict[str, Path]) -> Iterator[tuple[str, dict[str, Any]]]:
        files = {lang: read_language_file(path, lang=lang, name=f"{lang}.json") for lang, path in paths.items()}
        if self.builder_config.name == "questions":
            for q in link_questions(files):
                yield q.id, {**dataclasses.asdict(q), "relevant": list(q.relevant)}
        else:
            for f in files.values():
                for c in f.candidates:
                    yield c.id, dataclasses.asdict(c)


def load_xquad_r(
    *,
    data_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
) -> XquadR:
    """The whole benchmark, preparing both TFDS configs on first use.

    Prepared data lives in `data_dir`, else $UMR_TFDS_DIR, else
    ~/tensorflow_datasets; the official files come from `local_dir`, else
    $UMR_XQUAD_R_DIR, else the official URLs. Reading needs no TensorFlow.
    """
    rows = {}
    for config in ("questions", "candidates"):
        builder = XquadRBuilder(config=config, data_dir=sources.tfds_data_dir(data_dir), local_dir=local_dir)
        builder.download_and_prepare()
        rows[config] = sources.read_split(builder, SPLIT)
    return XquadR(
        questions=[XquadRQuestion(**{**r, "relevant": tuple(r["relevant"])}) for r in rows["questions"]],
        candidates=[XquadRCandidate(**r) for r in rows["candidates"]],
    )


def answer_texts(local_dir: str | os.PathLike[str] | None, langs: Iterable[str]) -> dict[str, str] | None:
    """'lang:question id' -> XQuAD's answer text in that language, read from the official files in
    `local_dir` (else $UMR_XQUAD_R_DIR); None when no local copy is named (the prepared TFDS data keeps
    questions and sentences, not answer spans)."""
    directory = sources.local_directory(local_dir, "UMR_XQUAD_R_DIR")
    if directory is None:
        return None
    out = {}
    for lang in sorted(set(langs)):
        path = directory / f"{lang}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the official XQuAD-R file for {lang!r} is not in {directory}")
        parsed = read_language_file(path, lang=lang, name=path.name)
        out.update({f"{lang}:{qid}": text for qid, text in parsed.answers.items()})
    return out


# ----------------------------------------------------------------------------- the benchmark as a task


def candidate_passages(candidates: Iterable[XquadRCandidate], template: str) -> list[Passage]:
    """Candidates as texts to encode or score, `template` filled with `sentence` and `context`.

    Sentence and paragraph are stripped first: some official ones carry leading
    or trailing whitespace (33 sentences; the paragraphs of 724 of the 13,014
    candidates), which would otherwise reach the tokenizer and double the
    separating space of "{sentence} {context}".
    """
    return [Passage(c.id, template.format(sentence=c.sentence.strip(), context=c.context.strip()))
            for c in candidates]


def select_questions(data: XquadR, languages: Sequence[str], per_language: int) -> list[XquadRQuestion]:
    """The questions in `languages` (all if empty); `per_language` > 0 keeps the first n question ids,
    the same ones in every language, so the languages stay comparable."""
    known = sorted({q.lang for q in data.questions})
    unknown = sorted(set(languages) - set(known))
    if unknown:
        raise ValueError(f"languages {unknown} are not in XQuAD-R; it has {known}")
    chosen = [q for q in data.questions if not languages or q.lang in languages]
    if per_language:
        qids = list(dict.fromkeys(q.qid for q in chosen))[:per_language]
        keep = set(qids)
        chosen = [q for q in chosen if q.qid in keep]
    return chosen


def same_language_share(ranking: run_files.Ranking, k: int = 20) -> float:
    """The fraction of the top k that is in the question's language (LAReQA's "language bias").

    A language-agnostic retriever puts 10 of the 11 relevant sentences in other
    languages; candidate ids start with their language.
    """
    return evaluate.same_language_share([p.split(":", 1)[0] for p in ranking.passage_ids[:k]], ranking.lang)


def per_query_metrics(rankings: Sequence[run_files.Ranking], questions: Sequence[XquadRQuestion],
                      measures: Sequence[str]) -> dict[str, dict[str, float]]:
    """`measures` and the same-language share of the top 20 (`same_lang@20`) for each question.

    Rankings of other queries are ignored; a question without one scores 0.
    """
    qrels = {q.id: set(q.relevant) for q in questions}
    ranked = [r for r in rankings if r.query_id in qrels]
    per_query = evaluate.ranked_metrics(run_files.as_run(ranked), qrels, measures)
    for r in ranked:
        per_query[r.query_id]["same_lang@20"] = same_language_share(r)
    for q in questions:  # no ranking: nothing in the top 20 at all
        per_query[q.id].setdefault("same_lang@20", 0.0)
    return per_query


def evaluate_rankings(rankings: Sequence[run_files.Ranking], questions: Sequence[XquadRQuestion],
                      measures: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per query language and macro-averaged: the benchmark reports languages, not the pooled mean."""
    per_query = per_query_metrics(rankings, questions, measures)
    return evaluate.by_language(per_query, {q.id: q.lang for q in questions})
