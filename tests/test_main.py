"""The UMR binary end to end on configs/tiny.py: stages, outputs, resumption, export, config errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import tiny_config
from umr_jax import distill, main, retriever, run_files, sharding, teacher
from umr_jax.workdir import ConfigMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = [f"round-{r}/{s}" for r in range(3) for s in ("encode", "index", "retrieve", "evaluate")] + \
         [f"round-{r}/{s}" for r in (1, 2) for s in ("teacher", "train")] + ["export"]


def _manifest(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "manifest.json").read_text())


def test_every_stage_runs_and_leaves_its_outputs(tiny_run):
    assert sorted(_manifest(tiny_run)["stages"]) == sorted(STAGES)
    summary = json.loads((tiny_run / "metrics.json").read_text())
    assert sorted(summary["dev"]) == ["round-0", "round-1", "round-2"]
    assert set(summary["stage_seconds"]) == set(STAGES)
    for r in range(3):
        table = json.loads((tiny_run / f"round-{r}" / "metrics.json").read_text())
        assert set(table) == {"de", "en", "fr", "avg"} and 0 <= table["avg"]["map@20"] <= 1
    assert (tiny_run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tiny_run / "tensorboard"))
    scores = np.load(tiny_run / "round-1" / "teacher" / "scores.npy")
    assert scores.shape == (32, 8) and np.all(scores < 0)  # mean log-probabilities
    # Training moved the towers away from their common initialisation, each its own way.
    q = load_file(tiny_run / "export" / "query" / "model.safetensors")
    p = load_file(tiny_run / "export" / "passage" / "model.safetensors")
    name = "encoder.layer.1.output.dense.weight"
    assert not np.array_equal(q[name], p[name])
    # The index refresh: round 1's passage tower ranks differently from round 0's.
    runs = [(tiny_run / f"round-{r}" / "run-dev.jsonl").read_text() for r in (0, 1)]
    assert runs[0] != runs[1]


def test_rerunning_a_finished_run_redoes_nothing(tiny_run):
    before = _manifest(tiny_run)
    tables = main.run(tiny_config(), str(tiny_run))
    assert _manifest(tiny_run) == before
    assert tables[2] == json.loads((tiny_run / "round-2" / "metrics.json").read_text())


class InterruptedRunError(Exception):
    pass


def test_a_run_interrupted_mid_training_resumes_to_the_same_result(tiny_run, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    original = distill.Trainer.step
    calls = {"n": 0}

    def step_then_die(self, batch, step_index):
        calls["n"] += 1
        if calls["n"] == 7:  # round 2, step 3 of 4: after the checkpoint at step 2
            raise InterruptedRunError
        return original(self, batch, step_index)

    monkeypatch.setattr(distill.Trainer, "step", step_then_die)
    with pytest.raises(InterruptedRunError):
        main.run(tiny_config(), str(workdir))
    stages = _manifest(workdir)["stages"]
    assert "round-2/teacher" in stages and "round-2/train" not in stages
    monkeypatch.setattr(distill.Trainer, "step", original)
    main.run(tiny_config(), str(workdir))
    assert _manifest(workdir)["stages"]["round-2/train"]["info"]["resumed_at"] == 2
    assert _manifest(workdir)["stages"]["round-1/train"] == stages["round-1/train"]  # not redone
    for tower in ("query", "passage"):
        ours = load_file(workdir / "export" / tower / "model.safetensors")
        reference = load_file(tiny_run / "export" / tower / "model.safetensors")
        for name, value in reference.items():
            np.testing.assert_array_equal(ours[name], value, err_msg=f"{tower} {name}")
    assert json.loads((workdir / "metrics.json").read_text())["dev"] == \
        json.loads((tiny_run / "metrics.json").read_text())["dev"]


def test_exported_towers_load_in_transformers_and_sentence_transformers(tiny_run):
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    texts = ["kalomi nesuta ripove", "a longer text with several words in it, and punctuation."]
    for tower in ("query", "passage"):
        directory = str(tiny_run / "export" / tower)
        cfg = tiny_config().retriever
        cfg.checkpoint = directory
        ours = retriever.Retriever.from_config(cfg, sharding.make_mesh((-1, 1))).encode(texts, tower)
        st = SentenceTransformer(directory, device="cpu").encode(texts, convert_to_numpy=True)
        np.testing.assert_allclose(st, ours, atol=1e-5)
        tok = transformers.AutoTokenizer.from_pretrained(directory)
        prefix = cfg.query_prefix if tower == "query" else cfg.passage_prefix
        batch = tok([prefix + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = transformers.AutoModel.from_pretrained(directory)(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        np.testing.assert_allclose(pooled, ours, atol=1e-5)


@pytest.mark.parametrize("key, value, error, message", [
    ("retriever.checkpoint", "/no/such/model", FileNotFoundError, "--config.retriever.checkpoint=/no/such/model"),
    ("teacher.checkpoint", "gguf:/no/such.gguf", FileNotFoundError, "no such file /no/such.gguf"),
    ("mesh_shape", (3, -1), ValueError, "mesh shape"),
    ("task", "nope", ValueError, "task='nope'"),
    ("k", 2, ValueError, "passages_per_query=4 exceeds k=2"),
    ("retriever.checkpoint", "https://example.com/model.bin", FileNotFoundError, "no such model directory"),
    ("teacher.checkpoint", "../../no-such-model", FileNotFoundError, "no such model directory"),
    ("data.local_dir", "/nonexistent", FileNotFoundError, "--config.data.local_dir=/nonexistent: no such directory"),
])
def test_bad_configs_fail_before_any_heavy_work(tmp_path, key, value, error, message):
    cfg = tiny_config()
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        main.Run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "round-0").exists()


def test_a_workdir_refuses_another_config(tmp_path):
    bad = tiny_config()
    bad.data.num_passages = 1  # a data mistake: fails before the workdir records any config
    with pytest.raises(ValueError, match="num_passages"):
        main.Run(bad, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "config.json").exists()
    main.Run(tiny_config(), str(tmp_path / "run")).close()
    other = tiny_config()
    other.data.num_passages = 95
    with pytest.raises(ConfigMismatchError, match=r"data\.num_passages: 96 -> 95"):
        main.Run(other, str(tmp_path / "run"))


@pytest.mark.parametrize("argv, line", [
    (["umr_jax.main", "--config.trian.epochs=3"],
     "umr_jax.main: error: --config.trian.epochs: unknown config key 'trian'; did you mean 'train'?"),
    (["umr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}", "--config.train.learning_rat=0.1"],
     "umr_jax.main: error: --config.train.learning_rat: unknown config key 'learning_rat'; "
     "did you mean 'learning_rate'?"),
    (["umr_jax.main", "--config.train.epochs=three"],
     "umr_jax.main: error: flag --config.train.epochs=three: could not convert string to float: 'three'"),
    (["umr_jax.export", "--config.poling=cls", "--out=x"],
     "umr_jax.export: error: --config.poling: unknown config key 'poling'; did you mean 'pooling'?"),
    (["umr_jax.retrieve", "--config.index.bakend=exact"],
     "umr_jax.retrieve: error: --config.index.bakend: unknown config key 'bakend'; did you mean 'backend'?"),
    (["umr_jax.xquad_r_eval", "--config.k=abc"],
     "umr_jax.xquad_r_eval: error: flag --config.k=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_flag_mistakes_end_every_binary_with_one_line(tmp_path, argv, line):
    done = subprocess.run([sys.executable, "-m", *argv, f"--workdir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [line]
    assert not os.listdir(tmp_path)


def test_teacher_score_chunks_are_checked_before_reuse(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.array([-1.0, -2.0, -0.5], np.float32))
    np.testing.assert_array_equal(main.read_scores(str(good), 3), [-1.0, -2.0, -0.5])
    assert main.read_scores(str(good), 4) is None  # not the chunk's size
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:-5])
    assert main.read_scores(str(truncated), 3) is None
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([-1.0, np.nan, -0.5], np.float32))
    assert main.read_scores(str(nan), 3) is None
    assert main.read_scores(str(tmp_path / "missing.npy"), 3) is None


def test_teacher_rerank_reorders_only_the_top_k_by_teacher_score(tiny_run, tmp_path):
    cfg = tiny_config()
    cfg.rerank.queries_per_language, cfg.rerank.k = 2, 5
    run = main.Run(cfg, str(tmp_path))
    (tmp_path / "round-0").mkdir()
    (tmp_path / "round-0" / "run-dev.jsonl").write_bytes((tiny_run / "round-0" / "run-dev.jsonl").read_bytes())
    averages = run.rerank(0)
    chosen = run.rerank_queries()
    assert sorted(q.lang for q in chosen) == ["de", "de", "en", "en", "fr", "fr"]
    student = run_files.read_jsonl(str(tmp_path / "round-0" / "run-dev-student.jsonl"))
    reranked = run_files.read_jsonl(str(tmp_path / "round-0" / "run-dev-rerank.jsonl"))
    assert [x.query_id for x in student] == [x.query_id for x in reranked] == [q.id for q in chosen]
    for s, t in zip(student, reranked, strict=True):
        assert sorted(s.passage_ids[:5]) == sorted(t.passage_ids[:5]) and s.passage_ids[5:] == t.passage_ids[5:]
        assert list(t.scores[:5]) == sorted(t.scores[:5], reverse=True)
    # The scores are the teacher's: a fresh teacher gives them for the reranked pairs.
    model = teacher.Teacher.from_config(cfg.teacher, run.mesh, seed=int(cfg.seed))
    texts = run.task.teacher_lookup([p for x in reranked for p in x.passage_ids[:5]])
    queries = {q.id: q for q in chosen}
    fresh = model.score([queries[x.query_id].text for x in reranked for _ in range(5)],
                        [(texts[p].title, texts[p].text) for x in reranked for p in x.passage_ids[:5]],
                        [x.lang for x in reranked for _ in range(5)], progress=False)
    np.testing.assert_allclose(fresh, [s for x in reranked for s in x.scores[:5]], rtol=1e-5, atol=1e-5)
    assert averages["teacher"] == run.task.evaluate(reranked, chosen)["avg"]
    assert averages["student"] == run.task.evaluate(student, chosen)["avg"]
    with pytest.raises(ValueError, match=r"rerank\.k"):
        cfg.rerank.k = 200
        main.validate(cfg)
