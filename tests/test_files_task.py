"""The files task (your own data in BEIR / TREC files): XQuAD-R written out as BEIR files gives the xquad_r task's
queries, rankings and metrics; every input file's mistakes are reported with file and line."""

from __future__ import annotations

import json
import pathlib
import signal

import numpy as np
import pytest

from helpers import recorded_stages, run_tiny
from umr_jax import faults, run_files, tasks
from umr_jax.data.readers import InputError, Query, read_qrels, read_queries, read_queries_jsonl

XQUAD_MEASURES = ("map@20", "recall@1", "recall@10", "recall@100", "mrr@10")


def xquad_r_config(shared_data: pathlib.Path):
    cfg = tasks.default_config()
    cfg.local_dir = str(shared_data / "xquad-r")
    cfg.languages = ("de", "zh")
    cfg.max_articles = 6
    cfg.candidate_template = cfg.teacher_template = "{sentence}"
    return cfg


def write_beir(task: tasks.Task, shared_data: pathlib.Path, out: pathlib.Path, with_qrels: bool = True) -> None:
    """XQuAD-R as BEIR files: the pool as corpus.jsonl, training then dev questions as queries.jsonl, and the
    dev questions' relevant sentences (their translations in the pool) as qrels/dev.tsv."""
    from umr_jax.data.xquad_r import load_xquad_r

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w") as f:
        for p in task.passages:
            f.write(json.dumps({"_id": p.id, "title": "", "text": p.text, "metadata": {"lang": p.id.split(":")[0]}},
                               ensure_ascii=False) + "\n")
    with open(out / "queries.jsonl", "w") as f:
        for q in task.train_queries + task.dev_queries:
            f.write(json.dumps({"_id": q.id, "text": q.text, "lang": q.lang}, ensure_ascii=False) + "\n")
    if with_qrels:
        pool = {p.id for p in task.passages}
        relevant = {q.id: q.relevant for q in load_xquad_r(local_dir=str(shared_data / "xquad-r")).questions}
        (out / "qrels").mkdir(exist_ok=True)
        with open(out / "qrels" / "dev.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in task.dev_queries:
                f.writelines(f"{q.id}\t{p}\t1\n" for p in relevant[q.id] if p in pool)


def files_config(beir: pathlib.Path, with_qrels: bool = True):
    cfg = tasks.default_config()
    cfg.corpus, cfg.queries = str(beir / "corpus.jsonl"), str(beir / "queries.jsonl")
    cfg.qrels = str(beir / "qrels" / "dev.tsv") if with_qrels else ""
    cfg.measures = XQUAD_MEASURES
    return cfg


@pytest.fixture(scope="module")
def beir(shared_data, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("beir")
    write_beir(tasks.build_task("xquad_r", xquad_r_config(shared_data)), shared_data, out)
    return out


def test_xquad_r_as_beir_files_gives_the_same_task_and_metrics(shared_data, beir):
    cfg = xquad_r_config(shared_data)
    cfg.max_train_queries, cfg.max_dev_queries = 24, 60
    reference = tasks.build_task("xquad_r", cfg)
    files_cfg = files_config(beir)
    files_cfg.max_train_queries, files_cfg.max_dev_queries = 24, 60
    task = tasks.build_task("files", files_cfg)
    assert task.train_queries == reference.train_queries  # the same seeded samples, in the same order
    assert task.dev_queries == reference.dev_queries
    chunks = [p for _, chunk, _ in task.chunk_source(50)(set()) for p in chunk]
    assert [(p.id, p.text) for p in chunks] == [(p.id, p.text) for p in reference.passages]
    # Any rankings score the same: random ones, and a perfect one (every relevant first).
    ids = [p.id for p in reference.passages]
    rng = np.random.default_rng(0)
    rankings = [run_files.Ranking(q.id, q.lang, list(rng.permutation(ids)[:100]), [0.0] * 100)
                for q in reference.dev_queries]
    assert task.evaluate(rankings) == reference.evaluate(rankings)
    assert set(task.evaluate(rankings)["avg"]) == {*XQUAD_MEASURES, "same_lang@20"}
    qrels, _ = read_qrels(beir / "qrels" / "dev.tsv")
    perfect = [run_files.Ranking(q.id, q.lang, sorted(qrels[q.id]), [1.0] * len(qrels[q.id]))
               for q in task.dev_queries]
    assert task.evaluate(perfect)["avg"]["map@20"] == pytest.approx(1.0)
    assert task.evaluate(perfect) == reference.evaluate(perfect)


def assert_read_metrics_score_the_answers(workdir: pathlib.Path, shared_data: pathlib.Path) -> None:
    """read/metrics.json is XOR-Full's F1 / EM / BLEU of read/answers.jsonl against XQuAD's answers."""
    from umr_jax import evaluate
    from umr_jax.answer_metrics import score_example
    from umr_jax.data.xquad_r import answer_texts

    rows = [json.loads(line) for line in (workdir / "read" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {r["lang"] for r in rows} == {"de", "zh"}
    gold = answer_texts(str(shared_data / "xquad-r"), ["de", "zh"])
    per_query = {}
    for r in rows:
        s = score_example(r["answer"], [gold[r["id"]]], r["lang"])
        per_query[r["id"]] = {"f1": s.f1, "em": s.em, "bleu": s.bleu}
    expected = evaluate.by_language(per_query, {r["id"]: r["lang"] for r in rows})
    assert json.loads((workdir / "read" / "metrics.json").read_text()) == json.loads(json.dumps(expected))
    assert "read" in recorded_stages(workdir)


def test_a_umr_run_on_beir_files_equals_the_xquad_r_run(shared_data, beir, tmp_path):
    """The whole pipeline (encode, search, teacher, training, evaluation) from the BEIR files ranks and scores as
    the xquad_r task does (random tiny models: the equality is the point, not the numbers)."""
    common = ["--config.rounds=1", "--config.export=False", "--config.data.max_train_queries=16",
              "--config.data.max_dev_queries=40"]
    xquad = run_tiny(tmp_path / "xquad", *common, "--config.task=xquad_r",
                     f"--config.data.local_dir={shared_data / 'xquad-r'}", "--config.data.languages=('de','zh')",
                     "--config.data.max_articles=6", "--config.data.candidate_template={sentence}",
                     # the read stage too (it changes no run file or dev metric)
                     "--config.read.k=2", "--config.read.checkpoint=random", "--config.read.dtype=float32",
                     "--config.read.param_dtype=float32", "--config.read.max_new_tokens=3")
    assert xquad.returncode == 0, xquad.stderr[-3000:]
    assert_read_metrics_score_the_answers(tmp_path / "xquad", shared_data)
    files = run_tiny(tmp_path / "files", *common, "--config.task=files", f"--config.data.corpus={beir}/corpus.jsonl",
                     f"--config.data.queries={beir}/queries.jsonl", f"--config.data.qrels={beir}/qrels/dev.tsv",
                     f"--config.data.measures={XQUAD_MEASURES}")
    assert files.returncode == 0, files.stderr[-3000:]
    for r in (0, 1):
        for name in ("run-dev.jsonl", "run-train.jsonl") if r == 0 else ("run-dev.jsonl",):
            assert (tmp_path / "files" / f"round-{r}" / name).read_text() == \
                (tmp_path / "xquad" / f"round-{r}" / name).read_text(), (r, name)
    ours, theirs = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("files", "xquad"))
    assert ours["dev"] == theirs["dev"]
    assert ours["dev_metric"] == "map@20" and ours["labels"] == "dev qrels"


def test_without_qrels_the_run_holds_out_queries_and_reports_label_free_measures(shared_data, tmp_path):
    beir = tmp_path / "beir"
    write_beir(tasks.build_task("xquad_r", xquad_r_config(shared_data)), shared_data, beir, with_qrels=False)
    cfg = files_config(beir, with_qrels=False)
    cfg.heldout_queries = 12
    task = tasks.build_task("files", cfg)
    assert len(task.dev_queries) == 12 and not task.labeled
    assert not {q.id for q in task.dev_queries} & {q.id for q in task.train_queries}
    flags = ("--config.rounds=0", "--config.export=False", "--config.task=files",
             f"--config.data.corpus={beir}/corpus.jsonl", f"--config.data.queries={beir}/queries.jsonl",
             "--config.data.heldout_queries=12", "--config.data.max_train_queries=16",
             "--config.data.agreement_k=5", "--config.teacher_chunk=32")
    # Killed once the first chunk of round 0's agreement scores is committed: the re-run keeps it.
    killed = run_tiny(tmp_path / "run", *flags, env={faults.ENV: "teacher.chunk_committed"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first_chunk = tmp_path / "run" / "round-0" / "agreement" / "chunk-000000.npy"
    committed = first_chunk.stat().st_mtime_ns
    assert "round-0/agreement" not in recorded_stages(tmp_path / "run")
    done = run_tiny(tmp_path / "run", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert first_chunk.stat().st_mtime_ns == committed
    assert "no dev metric exists" in done.stderr
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["dev_metric"] is None and summary["labels"].startswith("none")
    # Round 0 holds every stage the unlabeled task adds; the training rounds are the labeled task's (above).
    avg = summary["dev"]["round-0"]["avg"]
    assert set(avg) == {"teacher_kendall@5", "teacher_top1@5", "same_lang@20"}
    assert -1 <= avg["teacher_kendall@5"] <= 1 and 0 <= avg["teacher_top1@5"] <= 1
    assert np.load(tmp_path / "run" / "round-0" / "agreement" / "scores.npy").shape == (12 * 5,)
    assert "round-0/agreement" in recorded_stages(tmp_path / "run")


# --------------------------------------------------------------------------- mistakes in each file


def _write(path: pathlib.Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(("line", "reason"), [
    ('{"_id": "p2", "text": ', "malformed JSON"),
    ('["p2", "text"]', "expected an object"),
    ('{"_id": "p2"}', "missing field: text"),
    ('{"text": "no id"}', "missing field: _id"),
    ('{"_id": "p2", "text": "   "}', "empty text: passage 'p2'"),
    ('{"_id": "p1", "text": "again"}', "duplicate id: 'p1'"),
    ('{"_id": "p2", "text": "x", "lang": "xx"}', "bad language"),
    ('{"_id": "p2", "text": "x", "title": 3}', "bad title"),
])
def test_corpus_jsonl_mistakes_name_the_file_and_line(tmp_path, line, reason):
    from helpers import read_passages

    path = _write(tmp_path / "corpus.jsonl", ['{"_id": "p1", "title": "T", "text": "one", "lang": "de"}', line])
    with pytest.raises(InputError, match=f"corpus.jsonl:2: .*{reason}"):
        read_passages(path)
    passages, report = read_passages(path, on_error="skip")
    assert [(p.id, p.title, p.lang) for p in passages] == [("p1", "T", "de")]
    assert report.read == 2 and report.num_skipped == 1


def test_queries_need_a_language_or_a_default(tmp_path):
    path = _write(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "wer?", "lang": "de"}',
                                               '{"_id": "q2", "text": "who?"}',
                                               '{"_id": "q3", "text": "qui?", "metadata": {"language": "fr-FR"}}'])
    with pytest.raises(InputError, match=r"queries\.jsonl:2: missing field: lang"):
        read_queries_jsonl(path)
    queries, _ = read_queries_jsonl(path, default_lang="en")
    assert [(q.id, q.lang) for q in queries] == [("q1", "de"), ("q2", "en"), ("q3", "fr")]
    with pytest.raises(ValueError, match="unknown language code 'klingon'"):
        read_queries_jsonl(path, default_lang="klingon")


def test_gzipped_files_tsv_topics_and_other_id_fields(tmp_path):
    """What other multilingual collections ship: gzipped JSONL with `docid` (MIRACL, Mr. TyDi), TSV topics."""
    import gzip

    from helpers import read_passages

    with gzip.open(tmp_path / "corpus.jsonl.gz", "wt") as f:
        f.write('{"docid": "7#0", "title": "T", "text": "seven"}\n{"docid": "7#1", "title": "T", "text": "more"}\n')
    passages, report = read_passages(tmp_path / "corpus.jsonl.gz")
    assert [p.id for p in passages] == ["7#0", "7#1"] and report.used == 2
    topics = _write(tmp_path / "topics.tsv", ["1\twas ist das?", "2\twer?"])
    with pytest.raises(ValueError, match="no language column; set the default language"):
        read_queries(topics)
    queries, _ = read_queries(topics, default_lang="de")
    assert [(q.id, q.text, q.lang) for q in queries] == [("1", "was ist das?", "de"), ("2", "wer?", "de")]
    bad = _write(tmp_path / "bad.tsv", ["1\tok", "2\ttoo\tmany"])
    with pytest.raises(InputError, match=r"bad\.tsv:2: wrong column count: expected 2"):
        read_queries(bad, default_lang="de")
    jsonl = _write(tmp_path / "q.jsonl", ['{"query_id": "9", "query": "quoi?", "lang": "fr"}'])
    assert read_queries(jsonl)[0] == [Query("9", "quoi?", "fr")]


def test_jsonl_corpus_chunks_shard_across_processes_and_resume(tmp_path):
    """Chunk c is the same lines in every process and run: two processes' chunks are disjoint and cover the
    corpus (a bad line is counted in its chunk), and finished chunks are stepped over."""
    from umr_jax.data.readers import iter_passage_chunks

    lines = [json.dumps({"_id": f"p{i}", "text": f"passage {i}"}) for i in range(10)]
    lines[4] = '{"_id": "p4"}'
    path = _write(tmp_path / "corpus.jsonl", lines)
    shards = [list(iter_passage_chunks(path, 3, shard_index=s, num_shards=2, on_error="skip")) for s in (0, 1)]
    assert [c for c, _, _ in shards[0]] == [0, 2] and [c for c, _, _ in shards[1]] == [1, 3]
    ids = sorted((p.id for shard in shards for _, chunk, _ in shard for p in chunk), key=lambda i: int(i[1:]))
    assert ids == [f"p{i}" for i in range(10) if i != 4]
    assert sum(r.num_skipped for shard in shards for _, _, r in shard) == 1
    resumed = list(iter_passage_chunks(path, 3, shard_index=0, num_shards=2, skip_chunks={0}, on_error="skip"))
    assert [(c, [p.id for p in chunk]) for c, chunk, _ in resumed] == [(2, ["p6", "p7", "p8"])]


def test_qrels_in_beir_and_trec_form(tmp_path):
    beir = _write(tmp_path / "dev.tsv", ["query-id\tcorpus-id\tscore", "q1\tp1\t1", "q1\tp2\t0", "q2\tp3\t2"])
    trec = _write(tmp_path / "dev.qrels", ["q1 0 p1 1", "q1 0 p2 0", "q2 0 p3 2"])
    assert read_qrels(beir)[0] == read_qrels(trec)[0] == {"q1": {"p1": 1, "p2": 0}, "q2": {"p3": 2}}


@pytest.mark.parametrize(("line", "reason"), [
    ("q1\tp1", "wrong column count: expected 3"),
    ("q1\tp1\thigh", "bad grade: 'high' is not an integer"),
    ("q0\tp0\t1", "duplicate judgement: query 'q0', passage 'p0'"),
    ("q1\t\t1", "empty id"),
])
def test_qrels_mistakes_name_the_file_and_line(tmp_path, line, reason):
    path = _write(tmp_path / "dev.tsv", ["query-id\tcorpus-id\tscore", "q0\tp0\t1", line])
    with pytest.raises(InputError, match=f"dev.tsv:3: {reason}"):
        read_qrels(path)
    qrels, report = read_qrels(path, on_error="skip")
    assert qrels == {"q0": {"p0": 1}} and report.num_skipped == 1


def test_graded_qrels_reach_ndcg():
    from umr_jax import evaluate

    run = {"q": ["a", "b", "c"]}
    graded = evaluate.ranked_metrics(run, {"q": {"a": 1, "b": 2, "c": 0}}, ("ndcg@10",))["q"]["ndcg@10"]
    # trec_eval's gains are the grades themselves: DCG over the ideal order's
    assert graded == pytest.approx((1 / np.log2(2) + 2 / np.log2(3)) / (2 / np.log2(2) + 1 / np.log2(3)))
    with pytest.raises(ValueError, match="no relevant passage"):
        evaluate.ranked_metrics(run, {"q": {"a": 0}}, ("ndcg@10",))


@pytest.mark.parametrize(("change", "error"), [
    ({"corpus": ""}, "data.corpus: the files task needs the passages"),
    ({"corpus": "/nonexistent/corpus.jsonl"}, r"--config.data.corpus=/nonexistent/corpus.jsonl: no such file"),
    ({"queries": ""}, "data.queries: the files task needs the training queries"),
    ({"qrels": "/nonexistent/dev.tsv"}, r"--config.data.qrels=/nonexistent/dev.tsv: no such file"),
    ({"measures": ("ndcg@ten",)}, "unknown measure 'ndcg@ten'"),
    ({"qrels": "", "heldout_queries": 10_000}, "data.heldout_queries=10000"),
    ({"languages": ("xx",)}, r"data.languages: \['xx'\] not in the query files"),
])
def test_files_task_config_mistakes(beir, change, error):
    cfg = files_config(beir)
    for key, value in change.items():
        cfg[key] = value
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        tasks.build_task("files", cfg)


def test_a_data_mistake_ends_the_run_with_one_line_and_leaves_no_config_record(beir, tmp_path):
    """The corrected command must not be refused as 'another config' by a record the failed start left."""
    done = run_tiny(tmp_path / "run", "--config.task=files", f"--config.data.corpus={beir}/corpus.jsonl",
                    f"--config.data.queries={tmp_path}/missing.jsonl")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"umr_jax.main: error: --config.data.queries={tmp_path}/missing.jsonl: no such file")
    assert not (tmp_path / "run" / "config.json").exists()
