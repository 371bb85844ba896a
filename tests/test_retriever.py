"""The Retriever end to end on a tiny checkpoint: tokenize, batch, shard, encode, export."""

import numpy as np
import pytest
import transformers

from helpers import TINY, tiny_torch_bert, torch_pooled
from umr_jax import sharding
from umr_jax.retriever import Retriever, default_config

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15", "w16 w17", "w3 w3 w3 w3 w3 w3",
         "w20 w21 w22 w23", "w7 w8", "w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41 w42 w43 w44 w45"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    ref = tiny_torch_bert(seed=7)
    ref.save_pretrained(root)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TINY["vocab_size"] - 5)]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root)
    return ref, str(root)


def _config(path: str, **overrides):
    cfg = default_config()
    cfg.checkpoint = path
    cfg.query_prefix = cfg.passage_prefix = ""
    cfg.normalize = False
    cfg.max_query_length = cfg.max_passage_length = 24
    cfg.pack_row_lengths = (8, 16, 24)
    cfg.length_buckets = (8, 16, 24)
    cfg.tokens_per_batch = 64
    cfg.update(overrides)
    return cfg


def _reference(ref, retriever, texts):
    out = []
    for ids in retriever.tokenize(texts, "passage"):
        ids = np.asarray([ids])
        out.append(torch_pooled(ref, ids, np.ones_like(ids))[0])
    return np.stack(out)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("mesh_shape", [(1, 1), (4, 2), (-1, 1)])
def test_encode_matches_reference_on_any_mesh(tiny_dir, eight_devices, packing, mesh_shape):
    import jax
    ref, path = tiny_dir
    devices = jax.devices()[:1] if mesh_shape == (1, 1) else None
    r = Retriever.from_config(_config(path, packing=packing), sharding.make_mesh(mesh_shape, devices=devices))
    got = r.encode(TEXTS, "passage", progress=False)
    np.testing.assert_allclose(got, _reference(ref, r, TEXTS), atol=1e-4, rtol=0)
    assert r.encode([], "query", progress=False).shape == (0, 32)


def test_towers_are_separate_and_export_round_trips(tiny_dir, tmp_path, eight_devices):
    _, path = tiny_dir
    r = Retriever.from_config(_config(path), sharding.make_mesh((4, 2)))
    assert not r.model.shared
    q = r.encode(TEXTS, "query", progress=False)
    np.testing.assert_allclose(q, r.encode(TEXTS, "passage", progress=False), atol=1e-6)  # same init
    out = r.export(str(tmp_path / "passage"), tower="passage")
    back = transformers.AutoModel.from_pretrained(out).eval()
    np.testing.assert_allclose(_reference(back, r, TEXTS), q, atol=1e-5, rtol=0)
    shared = Retriever.from_config(_config(path, shared_towers=True), sharding.make_mesh((4, 2)))
    assert shared.model.shared


def test_bad_settings(tiny_dir):
    _, path = tiny_dir
    r = Retriever.from_config(_config(path, max_passage_length=64), sharding.make_mesh((-1, 1)))
    with pytest.raises(ValueError, match="max_passage_length 64 exceeds the model's 40 positions"):
        r.encode(["w1"], "passage", progress=False)
    with pytest.raises(ValueError, match="unknown tower 'doc'"):
        r.encode(["w1"], "doc", progress=False)


def test_export_cli(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys
    ref, path = tiny_dir
    out = tmp_path / "cli"
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "umr_jax.export", f"--config.checkpoint={path}",
                           "--config.normalize=False", f"--out={out}", "--tower=query"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    back = transformers.AutoModel.from_pretrained(out).eval()
    ids, mask = np.asarray([[2, 7, 8, 9, 3]]), np.ones((1, 5), np.int64)
    np.testing.assert_allclose(torch_pooled(back, ids, mask), torch_pooled(ref, ids, mask), atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "umr_jax.export", "--config.checkpoint=/nope", f"--out={out}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "no such directory, and not a hub id" in bad.stderr


def test_retrieve_stage_end_to_end_and_resume(tiny_dir, tmp_path, eight_devices):
    """corpus TSV + queries JSONL -> run files equal to brute-force ranking of the same embeddings."""
    import json

    from umr_jax import retrieve, run_files
    _, path = tiny_dir
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\ttitle\n" + "".join(f"d{i}\t{t}\tw{i}\n" for i, t in enumerate(TEXTS)))
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "text": t, "lang": "en"}) + "\n"
                               for i, t in enumerate(TEXTS[:3])))
    cfg = retrieve.default_config()
    cfg.retriever = _config(path)
    cfg.k, cfg.encode.chunk_size, cfg.index.backend = 5, 3, "exact"
    work = tmp_path / "work"
    rankings = retrieve.run(cfg, str(corpus), str(queries), str(work))
    r = Retriever.from_config(cfg.retriever, sharding.make_mesh((-1, 1)))
    p = r.encode([f"w{i} {t}" for i, t in enumerate(TEXTS)], "passage", progress=False)
    q = r.encode(TEXTS[:3], "query", progress=False)
    expected = np.argsort(-(q @ p.T), axis=1, kind="stable")[:, :5]
    assert [x.passage_ids for x in rankings] == [[f"d{i}" for i in row] for row in expected]
    assert run_files.read_jsonl(work / "run.jsonl") == rankings
    assert len((work / "run.trec").read_text().splitlines()) == 15
    marker = work / "embeddings" / "chunk-000000.json"
    stamp = marker.stat().st_mtime_ns
    assert retrieve.run(cfg, str(corpus), str(queries), str(work)) == rankings
    assert marker.stat().st_mtime_ns == stamp  # finished chunks are not encoded again
