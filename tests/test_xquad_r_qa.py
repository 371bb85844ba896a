"""The XQuAD-R open-QA evaluation: which contexts the reader gets, how answers are scored, resumption, seeds."""

from __future__ import annotations

import json

from umr_jax import run_files, tasks, xquad_r_qa
from umr_jax.data.xquad_r import load_xquad_r


def fake_run(shared_data, tmp_path):
    """An xquad_r run directory: round 0 ranks each question's own-language answer sentence first, round 1 last."""
    data_cfg = tasks.default_config()
    data_cfg.local_dir = str(shared_data / "xquad-r")
    data_cfg.languages = ("de", "zh")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": "xquad_r", "data": data_cfg.to_dict()}))
    cfg = xquad_r_qa.default_config()
    cfg.questions_per_language = 3
    cfg.read.k = 1
    cfg.read.checkpoint = "random"
    cfg.read.param_dtype = cfg.read.dtype = "float32"
    cfg.read.max_new_tokens = 3
    cfg.read.chunk = 4
    cfg.resamples = 200
    qa = xquad_r_qa.QaEval(cfg, str(run), str(tmp_path / "out"))
    pool = [c.id for c in load_xquad_r(local_dir=data_cfg.local_dir).candidates if c.lang in ("de", "zh")]
    for r, first in ((0, True), (1, False)):
        rankings = []
        for q in qa.questions:
            own = next(p for p in q.relevant if p.startswith(q.lang + ":"))
            others = [p for p in pool[:5] if p not in q.relevant]
            ids = [own, *others] if first else [*others, own]
            rankings.append(run_files.Ranking(q.id, q.lang, ids, [1.0] * len(ids)))
        (run / f"round-{r}").mkdir()
        run_files.write_jsonl(str(run / f"round-{r}" / "run-dev.jsonl"), rankings)
    return cfg, run


def test_contexts_scores_resumption_and_seed_means(shared_data, tmp_path):
    cfg, run = fake_run(shared_data, tmp_path)
    out = tmp_path / "out"
    summary = xquad_r_qa.run(cfg, str(run), str(out), [0, 1])
    assert summary["questions"] == 6  # the same 3 question ids in de and zh
    assert len({q.split(":", 1)[1] for q in summary["languages"]}) == 3
    tables = summary["tables"]
    assert tables["round-0"]["avg"]["own_sentence"] == 1.0 and tables["round-1"]["avg"]["own_sentence"] == 0.0
    assert tables["oracle"]["avg"]["own_sentence"] == 1.0 and tables["round-1"]["avg"]["any_sentence"] == 0.0
    rows = [json.loads(line) for line in (out / "oracle" / "answers.jsonl").read_text().splitlines()]
    gold = {"de:56beb4343aeaaa14008c925b": "308"}
    assert all(r["gold"] for r in rows) and all(gold.get(r["id"], r["gold"]) == r["gold"] for r in rows)
    # The round-1 context is not the answer sentence: the oracle's own-sentence gain is exactly 1.
    diff = {(d["after"], d["before"], d["measure"]): d for d in summary["differences"]}
    assert diff[("round-1", "round-0", "own_sentence")]["mean"] == -1.0
    # Committed chunks are reused, not regenerated.
    chunk = out / "round-0" / "chunk-000000.json"
    mtime = chunk.stat().st_mtime_ns
    again = xquad_r_qa.run(cfg, str(run), str(out), [0, 1])
    assert chunk.stat().st_mtime_ns == mtime and again["tables"] == summary["tables"]
    # Two "seeds" with the same answers: the seed mean is the single evaluation.
    seeds = xquad_r_qa.combine_seeds([str(out), str(out)], 200)
    assert seeds["tables"] == json.loads(json.dumps(summary["tables"]))
