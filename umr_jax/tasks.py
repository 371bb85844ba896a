"""What a UMR run trains and evaluates on: a corpus, unlabeled training queries, judged dev queries.

Four tasks share one interface, chosen by ``config.task``:

  xor_retrieve  the paper's: XOR-TyDi QA train questions, a DPR TSV corpus
                (enwiki w100), XOR-Retrieve dev scored with R@2kt / R@5kt.
  xquad_r       XQuAD-R (LAReQA): questions of a fixed share of the 48 articles
                train, the others are dev; the pool is the multilingual answer
                sentences; mAP@20 and recall@k.
  files         your own data (configs/files.py): a BEIR corpus.jsonl or DPR TSV,
                BEIR queries.jsonl, optional BEIR / TREC qrels scored with
                pytrec_eval; without qrels, label-free measures on held-out queries.
  synthetic     generated text (configs/tiny.py): exercises every stage in seconds.

Training queries carry no labels here: a task hands the binary only their
text and language; judgements live in `evaluate`, which sees dev rankings only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from umr_jax import encode, evaluate, run_files, storage
from umr_jax.data.readers import Passage, PassageOffsets, Query, check_on_error, lookup_passages, read_queries

TASKS = ("xor_retrieve", "xquad_r", "files", "synthetic")
Table = dict[str, dict[str, float]]
PerQuery = dict[str, dict[str, float]]  # query id -> measure -> value


def default_config() -> ml_collections.ConfigDict:
    """Data section of a run config (keys of all tasks; each reads its own)."""
    cfg = ml_collections.ConfigDict()
    cfg.local_dir = ""  # official files ('' = the task's environment variable, else download)
    cfg.data_dir = ""  # prepared TFDS data ('' = $UMR_TFDS_DIR or ~/tensorflow_datasets)
    cfg.corpus = ""  # xor_retrieve, files: the passage file, DPR TSV (enwiki_20190201_w100.tsv) or BEIR .jsonl
    cfg.corpus_on_error = "raise"  # bad corpus lines: 'raise' or 'skip' (counted)
    cfg.languages = ()  # () = all; else only queries (and xquad_r candidates) in these languages
    cfg.max_train_queries = 0  # 0 = all; else a seeded sample of this many
    cfg.max_dev_queries = 0  # 0 = all; else a seeded sample of this many
    cfg.split_seed = 0
    # xquad_r
    cfg.train_article_fraction = 2 / 3  # share of the 48 articles whose questions train
    cfg.max_articles = 0  # 0 = all 48; else a seeded sample of articles (queries and pool shrink with it)
    cfg.candidate_template = "{sentence} {context}"  # LAReQA encodes the sentence with its context
    # What the teacher reads of a candidate ('' = the candidate text above). The
    # sentence alone: the context is shared by every sentence of a paragraph, so
    # with it the teacher cannot tell them apart, and it costs ~6x the tokens.
    cfg.teacher_template = "{sentence}"
    # files (configs/files.py): your own corpus and queries
    cfg.queries = ""  # BEIR queries.jsonl (_id, text, optional lang) or id<TAB>text TSV: the training queries
    cfg.dev_queries = ""  # '' = the queries file: its queries with qrels are dev, never trained on
    cfg.qrels = ""  # BEIR qrels TSV (query-id corpus-id score) or TREC qrels; '' = no labels
    cfg.default_language = ""  # the language of queries without a lang field ('' = they are an error)
    cfg.queries_on_error = "raise"  # bad query / qrels lines: 'raise' or 'skip' (counted)
    cfg.measures = ("ndcg@10", "recall@100", "mrr@10", "map@100")  # with qrels; the first is the headline
    cfg.heldout_queries = 100  # without qrels or dev_queries: training queries held out for label-free measures
    cfg.agreement_k = 10  # without qrels: the teacher scores each held-out query's top k (0 = skip)
    # synthetic
    cfg.num_passages = 96
    cfg.num_train_queries = 32
    cfg.num_dev_queries = 16
    cfg.synthetic_languages = ("en", "de", "fr")
    return cfg


@dataclasses.dataclass
class Task:
    """A corpus, training queries and dev queries with their judge."""

    name: str
    train_queries: list[Query]
    dev_queries: list[Query]
    # Per-query dev metrics of rankings for the given dev queries; a query
    # without a ranking scores 0. Per query, so that paired bootstrap
    # intervals (umr_jax/results.py) and subsets (the teacher rerank) use it.
    score_queries: Callable[[Sequence[run_files.Ranking], Sequence[Query]], PerQuery]
    passages: list[Passage] | None = None  # an in-memory corpus, or
    corpus_path: str = ""  # a DPR TSV file read in chunks
    corpus_on_error: str = "raise"
    primary_metric: str = "map@20"
    teacher_passages: list[Passage] | None = None  # what the teacher reads, if not `passages`
    # Dev query id -> its question's id, when queries are translations of each
    # other (XQuAD-R): bootstrap intervals resample such groups together.
    query_group: Callable[[str], str] | None = None
    # False: the dev queries have no relevance judgements; their measures are label-free.
    labeled: bool = True
    # Dev query id -> its gold answers, where the data has them: the read stage scores answers.
    answers: Mapping[str, Sequence[str]] | None = None
    # Where each passage's line starts in `corpus_path` (recorded when it was encoded), or None; a run sets
    # this so that lookups seek to the passages they need instead of streaming the corpus again.
    passage_offsets: Callable[[], PassageOffsets | None] = lambda: None

    def evaluate(self, rankings: Sequence[run_files.Ranking], queries: Sequence[Query] | None = None,
                 extra: PerQuery | None = None) -> Table:
        """Metrics per query language and their macro average, over `queries` (default: all dev queries);
        `extra` adds per-query measures computed elsewhere (the teacher's agreement)."""
        queries = self.dev_queries if queries is None else queries
        per_query = self.score_queries(rankings, queries)
        for query_id, values in (extra or {}).items():
            per_query.setdefault(query_id, {}).update(values)
        return evaluate.by_language(per_query, {q.id: q.lang for q in queries})

    def chunk_source(self, chunk_size: int, process_index: int = 0, process_count: int = 1) -> encode.ChunkSource:
        if self.passages is not None:
            return encode.list_chunks(self.passages, chunk_size, process_index, process_count)
        return encode.file_chunks(self.corpus_path, chunk_size, process_index, process_count,
                                  check_on_error(self.corpus_on_error))

    @functools.cached_property
    def _passages_by_id(self) -> dict[str, Passage]:
        return {p.id: p for p in self.passages or ()}

    @functools.cached_property
    def _teacher_passages_by_id(self) -> dict[str, Passage]:
        return {p.id: p for p in self.teacher_passages or ()}

    def lookup(self, ids: Sequence[str]) -> dict[str, Passage]:
        """Passage texts for training and for R@kt."""
        if self.passages is not None:
            return {i: self._passages_by_id[i] for i in ids}
        return lookup_passages(self.corpus_path, ids, offsets=self.passage_offsets(),
                               on_error=check_on_error(self.corpus_on_error))

    def teacher_lookup(self, ids: Sequence[str]) -> dict[str, Passage]:
        """Passage texts as the teacher reads them."""
        if self.teacher_passages is not None:
            return {i: self._teacher_passages_by_id[i] for i in ids}
        return self.lookup(ids)


def _sample(items: list, limit: int, seed: int, salt: int) -> list:
    if not limit or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng([seed, salt]).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def _check_languages(requested: Sequence[str], available: set[str], what: str) -> set[str]:
    unknown = sorted(set(requested) - available)
    if unknown:
        raise ValueError(f"data.languages: {unknown} not in {what}, which has {sorted(available)}")
    return set(requested) or available


# ----------------------------------------------------------------------------- XQuAD-R


def xquad_r_split(num_articles: int, fraction: float, seed: int) -> tuple[set[int], set[int]]:
    """Training and dev articles: a seeded permutation, the first `fraction` train."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.train_article_fraction={fraction} must be in (0, 1)")
    order = np.random.default_rng([seed, 7]).permutation(num_articles)
    cut = round(fraction * num_articles)
    return {int(a) for a in order[:cut]}, {int(a) for a in order[cut:]}


def article_of(candidate_id: str) -> int:
    """Candidate ids are lang:article:paragraph:sentence."""
    return int(candidate_id.split(":")[1])


def xquad_r_task(cfg: ml_collections.ConfigDict) -> Task:
    from umr_jax.data.xquad_r import answer_texts, candidate_passages, load_xquad_r, per_query_metrics

    data = load_xquad_r(data_dir=cfg.data_dir or None, local_dir=cfg.local_dir or None)
    langs = _check_languages(cfg.languages, {q.lang for q in data.questions}, "XQuAD-R")
    articles = sorted({article_of(c.id) for c in data.candidates})
    train_articles, dev_articles = xquad_r_split(len(articles), cfg.train_article_fraction, cfg.split_seed)
    if cfg.max_articles and not 2 <= cfg.max_articles <= len(articles):
        raise ValueError(f"data.max_articles={cfg.max_articles}: 0 (all) or 2..{len(articles)} (training and "
                         "dev articles both need one)")
    if cfg.max_articles:
        # The same share of a seeded sample of each side: a smaller task with the same split.
        keep = max(1, round(cfg.train_article_fraction * cfg.max_articles))
        train_articles = set(_sample(sorted(train_articles), keep, cfg.split_seed, 3))
        dev_articles = set(_sample(sorted(dev_articles), max(1, cfg.max_articles - keep), cfg.split_seed, 4))
    used_articles = train_articles | dev_articles
    pool = [c for c in data.candidates if c.lang in langs and article_of(c.id) in used_articles]
    pool_ids = {c.id for c in pool}
    questions = [q for q in data.questions if q.lang in langs]
    # 388 of the 13,090 official questions carry stray leading or trailing whitespace, which would
    # reach the tokenizer as an extra token ("▁" for e5): stripped, as the candidates are.
    questions = [dataclasses.replace(q, question=q.question.strip()) for q in questions]
    train = [Query(q.id, q.question, q.lang) for q in questions if article_of(q.relevant[0]) in train_articles]
    # Relevant = the answer sentence in every language of the pool.
    dev = [dataclasses.replace(q, relevant=tuple(r for r in q.relevant if r in pool_ids))
           for q in questions if article_of(q.relevant[0]) in dev_articles]
    dev = _sample(dev, cfg.max_dev_queries, cfg.split_seed, 2)
    train = _sample(train, cfg.max_train_queries, cfg.split_seed, 1)

    judged = {q.id: q for q in dev}
    # The answer spans (for the read stage) come from the official files, when a local copy is named.
    gold = answer_texts(cfg.local_dir or None, {q.lang for q in dev})

    def score_queries(rankings: Sequence[run_files.Ranking], queries: Sequence[Query]) -> PerQuery:
        return per_query_metrics(rankings, [judged[q.id] for q in queries],
                                 ("map@20", "recall@1", "recall@10", "recall@100", "mrr@10"))

    return Task("xquad_r", train, [Query(q.id, q.question, q.lang) for q in dev], score_queries,
                passages=candidate_passages(pool, cfg.candidate_template),
                teacher_passages=candidate_passages(pool, cfg.teacher_template) if cfg.teacher_template else None,
                query_group=lambda query_id: query_id.split(":", 1)[1],
                answers=None if gold is None else {q.id: (gold[q.id],) for q in dev})


# ----------------------------------------------------------------------------- XOR-TyDi


def xor_retrieve_task(cfg: ml_collections.ConfigDict) -> Task:
    from umr_jax.data.xor_tydi import load_xor_tydi

    if not cfg.corpus:
        raise ValueError("data.corpus: the xor_retrieve task needs the passage corpus (DPR TSV, e.g. "
                         "enwiki_20190201_w100.tsv); pass --config.data.corpus=/path/to/file.tsv")
    check_on_error(cfg.corpus_on_error)
    kw = dict(data_dir=cfg.data_dir or None, local_dir=cfg.local_dir or None)
    train_q = load_xor_tydi("retrieve", "train", **kw)
    dev_q = load_xor_tydi("retrieve", "dev", **kw)
    langs = _check_languages(cfg.languages, {q.lang for q in train_q} | {q.lang for q in dev_q}, "XOR-TyDi")
    train = _sample([Query(q.id, q.question, q.lang) for q in train_q if q.lang in langs],
                    cfg.max_train_queries, cfg.split_seed, 1)
    dev_q = _sample([q for q in dev_q if q.lang in langs], cfg.max_dev_queries, cfg.split_seed, 2)
    answers = {q.id: q.answers for q in dev_q}
    task = Task("xor_retrieve", train, [Query(q.id, q.question, q.lang) for q in dev_q], lambda r, q: {},
                corpus_path=cfg.corpus, corpus_on_error=cfg.corpus_on_error, primary_metric="R@5kt",
                answers=answers)

    def score_queries(rankings: Sequence[run_files.Ranking], queries: Sequence[Query]) -> PerQuery:
        texts = task.lookup(sorted({p for r in rankings for p in r.passage_ids}))
        # Passage text only, as the official evaluation reads it: MiuLab/UMR's dense_retriever writes
        # ctxs = [ctx["text"]] for eval_xor_retrieve.py, whose token cut then counts no titles.
        contexts = {r.query_id: [texts[p].text for p in r.passage_ids] for r in rankings}
        return evaluate.xor_retrieve_per_query(contexts, {q.id: answers[q.id] for q in queries})

    task.score_queries = score_queries
    return task


# ----------------------------------------------------------------------------- files


def _need_file(cfg: ml_collections.ConfigDict, key: str, what: str) -> str:
    path = cfg[key]
    if not path:
        raise ValueError(f"data.{key}: the files task needs {what}; pass --config.data.{key}=/path/to/file")
    if not storage.exists(path):
        raise FileNotFoundError(f"--config.data.{key}={path}: no such file")
    return path


def _read_queries(path: str, key: str, cfg: ml_collections.ConfigDict) -> list[Query]:
    queries, report = read_queries(path, on_error=check_on_error(cfg.queries_on_error),
                                   default_lang=cfg.default_language)
    logging.info("data.%s: %s", key, report.summary())
    if not queries:
        raise ValueError(f"--config.data.{key}={path}: no usable queries ({report.summary()})")
    return queries


def files_task(cfg: ml_collections.ConfigDict) -> Task:
    """Your own corpus and queries, in the formats IR people already use (configs/files.py).

    With qrels, the judged queries (those with a passage of grade > 0) are the
    dev queries and are never trained on; every other query of `data.queries`
    trains. Without qrels, `data.dev_queries` or a seeded sample of
    `heldout_queries` training queries is held out, and the measures are the
    label-free ones: the same-language share (when passages carry a language)
    and, added by the run, the teacher's agreement with the student's order.
    """
    from umr_jax.data.readers import corpus_format, read_qrels

    check_on_error(cfg.corpus_on_error)
    corpus = _need_file(cfg, "corpus", "the passages (BEIR corpus.jsonl or a DPR TSV)")
    queries = _read_queries(_need_file(cfg, "queries", "the training queries (BEIR queries.jsonl)"), "queries", cfg)
    dev_pool = _read_queries(_need_file(cfg, "dev_queries", "dev queries"), "dev_queries", cfg) \
        if cfg.dev_queries else queries
    langs = _check_languages(cfg.languages, {q.lang for q in queries} | {q.lang for q in dev_pool}, "the query files")
    queries = [q for q in queries if q.lang in langs]
    dev_pool = [q for q in dev_pool if q.lang in langs]
    measures = tuple(cfg.measures)
    for m in measures:
        evaluate.check_measure(m)
    qrels: dict[str, dict[str, int]] = {}
    if cfg.qrels:
        path = _need_file(cfg, "qrels", "relevance judgements")
        qrels, report = read_qrels(path, on_error=check_on_error(cfg.queries_on_error))
        logging.info("data.qrels: %s", report.summary())
        judged = {q for q, rel in qrels.items() if any(g > 0 for g in rel.values())}
        dev = [q for q in dev_pool if q.id in judged]
        known = {q.id for q in dev_pool}
        for count, why in ((len(set(qrels) - judged), "have no passage of grade > 0"),
                           (len(judged - known), "are not in the dev query file (or not in data.languages)")):
            if count:
                logging.warning("%s: %d judged queries %s: they are not evaluated", path, count, why)
        train = [q for q in queries if q.id not in qrels]
    elif cfg.dev_queries:
        dev = dev_pool
        train = [q for q in queries if q.id not in {d.id for d in dev}]
    else:
        if not 0 < cfg.heldout_queries < len(queries):
            raise ValueError(f"data.heldout_queries={cfg.heldout_queries}: without qrels the run holds out "
                             f"1..{len(queries) - 1} of the {len(queries)} training queries to measure itself on")
        held = {q.id for q in _sample(queries, cfg.heldout_queries, cfg.split_seed, 6)}
        dev = [q for q in queries if q.id in held]
        train = [q for q in queries if q.id not in held]
    dev = _sample(dev, cfg.max_dev_queries, cfg.split_seed, 2)
    train = _sample(train, cfg.max_train_queries, cfg.split_seed, 1)
    task = Task("files", train, dev, lambda r, q: {}, corpus_path=corpus, corpus_on_error=cfg.corpus_on_error,
                primary_metric=measures[0] if qrels else "", labeled=bool(qrels))

    def score_queries(rankings: Sequence[run_files.Ranking], queries: Sequence[Query]) -> PerQuery:
        wanted = [q.id for q in queries]  # in order: the means add in the same order in every run
        keep = set(wanted)
        ranked = [r for r in rankings if r.query_id in keep]
        if qrels:
            per_query = evaluate.ranked_metrics(run_files.as_run(ranked), {q: qrels[q] for q in wanted}, measures)
        else:
            per_query = {q: {} for q in wanted}
        langs = {} if corpus_format(corpus) == "tsv" else {  # a DPR TSV has no language column
            i: p.lang for i, p in task.lookup(sorted({p for r in ranked for p in r.passage_ids[:20]})).items()}
        if langs and all(langs.values()):  # the share needs every retrieved passage's language
            for r in ranked:
                per_query[r.query_id]["same_lang@20"] = evaluate.same_language_share(
                    [langs[p] for p in r.passage_ids[:20]], r.lang)
            for q in wanted:
                per_query[q].setdefault("same_lang@20", 0.0)
        return per_query

    task.score_queries = score_queries
    return task


# ----------------------------------------------------------------------------- synthetic


def synthetic_task(cfg: ml_collections.ConfigDict, seed: int = 0) -> Task:
    """Passages of pseudo-words; a query is four words of one passage, which is its relevant passage."""
    rng = np.random.default_rng([seed, 11])
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "xa", "zo", "gi", "be"]
    vocab = sorted({"".join(rng.choice(syllables, size=3)) for _ in range(600)})
    langs = list(cfg.synthetic_languages)
    passages = [Passage(f"p{i}", " ".join(rng.choice(vocab, size=rng.integers(8, 24))), title=f"doc {i}")
                for i in range(cfg.num_passages)]
    need = cfg.num_train_queries + cfg.num_dev_queries
    if need > len(passages):
        raise ValueError(f"data.num_train_queries + num_dev_queries = {need} exceeds num_passages "
                         f"{len(passages)}")
    targets = rng.permutation(len(passages))[:need]
    queries = [Query(f"q{j}", " ".join(rng.choice(passages[t].text.split(), size=4)), langs[j % len(langs)])
               for j, t in enumerate(targets)]
    train, dev = queries[:cfg.num_train_queries], queries[cfg.num_train_queries:]
    qrels = {q.id: {passages[t].id} for q, t in zip(dev, targets[cfg.num_train_queries:], strict=True)}

    def score_queries(rankings: Sequence[run_files.Ranking], queries: Sequence[Query]) -> PerQuery:
        return evaluate.ranked_metrics(run_files.as_run(rankings), {q.id: qrels[q.id] for q in queries},
                                       ("map@20", "recall@1", "recall@10", "mrr@10"))

    return Task("synthetic", train, dev, score_queries, passages=passages)


def build_task(name: str, cfg: ml_collections.ConfigDict, seed: int = 0) -> Task:
    if name == "xquad_r":
        task = xquad_r_task(cfg)
    elif name == "xor_retrieve":
        task = xor_retrieve_task(cfg)
    elif name == "files":
        task = files_task(cfg)
    elif name == "synthetic":
        task = synthetic_task(cfg, seed)
    else:
        raise ValueError(f"task={name!r}; choose one of {TASKS}")
    if not task.train_queries or not task.dev_queries:
        raise ValueError(f"task {name}: {len(task.train_queries)} training and {len(task.dev_queries)} dev "
                         "queries after filtering; check data.languages and the sample sizes")
    return task
