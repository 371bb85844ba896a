"""Tasks: the XQuAD-R article split, the pool a language subset searches, the synthetic task's known answers."""

from __future__ import annotations

import pytest

from umr_jax import run_files, tasks


def test_article_split_is_disjoint_seeded_and_two_thirds():
    train, dev = tasks.xquad_r_split(48, 2 / 3, seed=0)
    assert len(train) == 32 and len(dev) == 16 and not train & dev and train | dev == set(range(48))
    assert tasks.xquad_r_split(48, 2 / 3, seed=0) == (train, dev)
    assert tasks.xquad_r_split(48, 2 / 3, seed=1) != (train, dev)
    with pytest.raises(ValueError, match="train_article_fraction"):
        tasks.xquad_r_split(48, 1.0, seed=0)


def test_xquad_r_task_on_a_language_subset(shared_data):
    cfg = tasks.default_config()
    cfg.local_dir = str(shared_data / "xquad-r")
    cfg.languages = ("de", "zh")
    cfg.candidate_template = "{sentence}"
    task = tasks.build_task("xquad_r", cfg)
    assert {p.id.split(":")[0] for p in task.passages} == {"de", "zh"}
    # Questions of one article are all on one side of the split, in every language.
    train_ids = {q.id.split(":", 1)[1] for q in task.train_queries}
    dev_ids = {q.id.split(":", 1)[1] for q in task.dev_queries}
    assert train_ids and dev_ids and not train_ids & dev_ids
    assert {q.lang for q in task.dev_queries} == {"de", "zh"}
    assert 0.6 < len(train_ids) / (len(train_ids) + len(dev_ids)) < 0.75
    # A ranking that puts every relevant sentence first scores mAP@20 = 1: relevance is the pool's.
    from umr_jax.data.xquad_r import load_xquad_r
    relevant = {q.id: [r for r in q.relevant if r.split(":")[0] in ("de", "zh")]
                for q in load_xquad_r(local_dir=cfg.local_dir).questions}
    perfect = [run_files.Ranking(q.id, q.lang, relevant[q.id], [1.0] * len(relevant[q.id]))
               for q in task.dev_queries]
    assert task.evaluate(perfect)["avg"]["map@20"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in XQuAD-R"):
        cfg.languages = ("xx",)
        tasks.build_task("xquad_r", cfg)


def test_synthetic_task_has_known_answers():
    cfg = tasks.default_config()
    task = tasks.build_task("synthetic", cfg, seed=3)
    assert len(task.train_queries) == 32 and len(task.dev_queries) == 16 and len(task.passages) == 96
    ids = [p.id for p in task.passages]
    # A ranking by word overlap finds each dev query's passage (the query is four of its words).
    rankings = []
    for q in task.dev_queries:
        words = set(q.text.split())
        ranked = sorted(task.passages, key=lambda p: -len(words & set(p.text.split())))
        rankings.append(run_files.Ranking(q.id, q.lang, [p.id for p in ranked], [0.0] * len(ids)))
    assert task.evaluate(rankings)["avg"]["recall@10"] == pytest.approx(1.0)
    assert task.lookup(["p3"])["p3"].title == "doc 3"


def test_xor_retrieve_task_scores_rankings_over_a_tsv_corpus(shared_data, tmp_path):
    from umr_jax.data.xor_tydi import load_xor_tydi

    cfg = tasks.default_config()
    cfg.local_dir = str(shared_data / "xor-tydi")
    cfg.max_train_queries, cfg.max_dev_queries = 10, 4
    with pytest.raises(ValueError, match=r"data\.corpus"):
        tasks.build_task("xor_retrieve", cfg)
    cfg.corpus = str(tmp_path / "corpus.tsv")
    (tmp_path / "corpus.tsv").write_text("id\ttext\ttitle\np0\tnothing relevant here\tA\n")
    probe = tasks.build_task("xor_retrieve", cfg)
    assert len(probe.train_queries) == 10 and len(probe.dev_queries) == 4
    answers = {q.id: q.answers for q in load_xor_tydi("retrieve", "dev", local_dir=cfg.local_dir)}
    spans = {q.id: [a for a in answers[q.id] if a not in ("yes", "no")] for q in probe.dev_queries}
    hit = next(q for q in probe.dev_queries if spans[q.id])
    (tmp_path / "corpus.tsv").write_text("id\ttext\ttitle\np0\tnothing relevant here\tA\n"
                                         f"p1\tthe answer is {spans[hit.id][0]} indeed\tB\n")
    task = tasks.build_task("xor_retrieve", cfg)
    rankings = [run_files.Ranking(q.id, q.lang, ["p1", "p0"], [1.0, 0.0]) if q.id == hit.id
                else run_files.Ranking(q.id, q.lang, ["p0"], [0.0]) for q in task.dev_queries]
    table = task.evaluate(rankings)
    same_language = [q for q in task.dev_queries if spans[q.id] and q.lang == hit.lang]
    assert table[hit.lang]["R@2kt"] == pytest.approx(100.0 / len(same_language))
    assert all(row["R@5kt"] == 0 for lang, row in table.items() if lang not in (hit.lang, "avg"))
    # The title is not read: an answer only in the title is a miss, as in the official evaluation.
    (tmp_path / "corpus.tsv").write_text("id\ttext\ttitle\np0\tnothing relevant here\tA\n"
                                         f"p2\tnot in this text\t{spans[hit.id][0]}\n")
    task = tasks.build_task("xor_retrieve", cfg)
    title_only = [run_files.Ranking(q.id, q.lang, ["p2", "p0"], [1.0, 0.0]) for q in task.dev_queries]
    assert all(row["R@5kt"] == 0 for row in task.evaluate(title_only).values())
