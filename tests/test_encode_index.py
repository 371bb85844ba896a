"""Corpus encoding to resumable chunks; ScaNN and exact on-device search; run files."""

import hashlib
import os

import numpy as np
import pytest

from helpers import store_is_complete
from umr_jax import index, run_files, sharding
from umr_jax.data.readers import Passage
from umr_jax.encode import EmbeddingStore, StoreError, encode_corpus, file_chunks, list_chunks

DIM = 8


def fake_encode(texts, bar=None):
    """Deterministic text -> vector, so stored embeddings can be checked exactly."""
    out = np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:DIM * 4], dtype=np.uint32)
                    .astype(np.float32) / 2**32 for t in texts])
    if bar is not None:
        bar.update(len(texts))
    return out


class CountingEncoder:
    def __init__(self, fail_at_call: int | None = None):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, texts, bar=None):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        return fake_encode(texts, bar)


def _corpus(tmp_path, n=10):
    path = tmp_path / "corpus.tsv"
    path.write_text("id\ttext\ttitle\n" + "".join(f"p{i}\ttext {i}\ttitle {i}\n" for i in range(n)))
    return str(path)


def test_encode_writes_chunks_and_resumes_after_a_kill(tmp_path):
    corpus, out = _corpus(tmp_path), str(tmp_path / "emb")
    killed = CountingEncoder(fail_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(killed, file_chunks(corpus, 3, 0, 1, "raise"), out)
    store = EmbeddingStore(out)
    assert store.chunk_indices() == [0, 1] and not store_is_complete(store, 1)
    resumed = CountingEncoder()
    encode_corpus(resumed, file_chunks(corpus, 3, 0, 1, "raise"), out)
    assert resumed.calls == 2  # only chunks 2 and 3
    assert store_is_complete(store, 1)
    ids, emb = store.load()
    assert ids == [f"p{i}" for i in range(10)]
    np.testing.assert_array_equal(emb, fake_encode([f"title {i} text {i}" for i in range(10)]))
    assert store.report().used == 10


def test_corrupt_chunk_is_detected_and_reencoded(tmp_path):
    corpus, out = _corpus(tmp_path), str(tmp_path / "emb")
    encode_corpus(fake_encode, file_chunks(corpus, 4, 0, 1, "raise"), out)
    npy = tmp_path / "emb" / "chunk-000001.npy"
    npy.write_bytes(npy.read_bytes()[:-7])  # truncated by a crash or a bad copy
    store = EmbeddingStore(out)
    with pytest.raises(StoreError, match="chunk-000001"):
        store.load()
    again = CountingEncoder()
    encode_corpus(again, file_chunks(corpus, 4, 0, 1, "raise"), out)
    assert again.calls == 1
    assert store.load()[0] == [f"p{i}" for i in range(10)]


def test_two_processes_split_chunks_and_join_in_corpus_order(tmp_path):
    corpus, out = _corpus(tmp_path, 11), str(tmp_path / "emb")
    store = EmbeddingStore(out)
    encode_corpus(fake_encode, file_chunks(corpus, 2, 1, 2, "raise"), out, process_index=1, process_count=2)
    assert store.chunk_indices() == [1, 3, 5] and not store_is_complete(store, 2)
    with pytest.raises(StoreError, match="missing"):
        store.load()
    encode_corpus(fake_encode, file_chunks(corpus, 2, 0, 2, "raise"), out, process_index=0, process_count=2)
    assert store_is_complete(store, 2)
    assert store.load()[0] == [f"p{i}" for i in range(11)]


def test_duplicate_ids_across_chunks_are_an_error(tmp_path):
    passages = [Passage("a", "x"), Passage("b", "y"), Passage("a", "z")]
    out = str(tmp_path / "emb")
    encode_corpus(fake_encode, list_chunks(passages, 2, 0, 1), out)
    with pytest.raises(StoreError, match="duplicate passage ids"):
        EmbeddingStore(out).load()


def _clustered(n, dim, clusters, seed, noise=0.35):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), centers


def _recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def _exact(db, queries, k):
    scores = queries @ db.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(scores, np.take_along_axis(top, order, 1), 1)


@pytest.mark.parametrize("approx", [False, True])
def test_exact_index_on_the_mesh_equals_numpy(eight_devices, approx, tmp_path):
    db, _ = _clustered(3001, 32, 20, seed=1)  # 3001 rows: padding on every device layout
    queries = db[:50] + 0.01
    cfg = index.default_config()
    cfg.backend, cfg.exact.approx = "exact", approx
    mesh = sharding.make_mesh((4, 2), ("data", "model"))
    idx = index.build_index(db, cfg, mesh)
    result = idx.search(queries, 10, batch=16)
    truth_idx, truth_scores = _exact(db, queries, 10)
    np.testing.assert_allclose(result.scores, truth_scores, atol=1e-5)
    assert _recall(result.indices, truth_idx) == 1.0
    single = index.build_index(db, cfg, sharding.make_mesh((1, 1), devices=mesh.devices.flat[:1]))
    np.testing.assert_array_equal(single.search(queries, 10).indices, result.indices)
    idx.save(str(tmp_path / "exact"))
    assert os.listdir(tmp_path / "exact") == ["index.json"]  # the embeddings are the store's, not copied
    loaded = index.load_index(str(tmp_path / "exact"), cfg, mesh, embeddings=lambda: db)
    np.testing.assert_array_equal(loaded.search(queries, 10).indices, result.indices)


def test_scann_recall_at_100_on_200k_synthetic_vectors(tmp_path):
    db, centers = _clustered(200_000, 384, 1000, seed=0)
    rng = np.random.default_rng(5)
    queries = centers[rng.integers(0, 1000, 500)] + 0.35 * rng.normal(size=(500, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth, _ = _exact(db, queries, 100)
    scann = index.build_index(db, index.default_config(), k=100)
    result = index.search_all(scann, queries, 100, progress=False)
    assert not scann.params.get("brute_force")
    recall = _recall(result.indices, truth)
    assert recall >= 0.95, f"ScaNN recall@100 {recall:.3f} with {scann.params}"
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)  # best first
    scann.save(str(tmp_path / "scann"))
    loaded = index.load_index(str(tmp_path / "scann"), index.default_config())
    np.testing.assert_array_equal(loaded.search(queries[:20], 100).indices, result.indices[:20])


def test_index_input_errors(eight_devices):
    cfg = index.default_config()
    with pytest.raises(ValueError, match="backend"):
        cfg.backend = "faiss"
        index.build_index(np.ones((4, 2), np.float32), cfg)
    cfg.backend = "scann"
    small = index.build_index(np.eye(4, dtype=np.float32), cfg, k=2)
    with pytest.raises(ValueError, match=r"queries must be \(n, 4\)"):
        small.search(np.ones((1, 3), np.float32), 2)
    with pytest.raises(ValueError, match="k=9"):
        small.search(np.ones((1, 4), np.float32), 9)


def test_run_files_round_trip(tmp_path):
    ranks = run_files.rankings_from_search(["q1", "q2"], ["ar", "ja"], ["pa", "pb", "pc"],
                                           np.array([[0.9, 0.5], [0.7, 0.1]]), np.array([[2, 0], [1, 2]]))
    run_files.write_jsonl(tmp_path / "run.jsonl", ranks)
    run_files.write_trec(tmp_path / "run.trec", ranks, tag="t")
    assert run_files.read_jsonl(tmp_path / "run.jsonl") == ranks
    assert (tmp_path / "run.trec").read_text().splitlines()[:2] == ["q1 Q0 pc 1 0.900000 t", "q1 Q0 pa 2 0.500000 t"]
    assert run_files.as_run(ranks, k=1) == {"q1": ["pc"], "q2": ["pb"]}


def test_dpr_pair_template_gives_the_official_tensorizer_token_ids(tmp_path):
    """"{title}{sep}{text}" through our tokenize path == DPR's BertTensorizer.text_to_tensor (MiuLab/UMR's
    dpr/models/hf_models.py): tokenizer.encode(title, text_pair=text.strip(), max_length, truncation=True),
    or encode(text) for an untitled passage; a WordPiece vocabulary stands in for mBERT's."""
    import transformers

    from umr_jax.data.readers import Passage
    from umr_jax.encode import format_passage
    words = ["the", "river", "flows", "north", "city", "of", "paris", "berlin", "##s", "is", "a", "capital",
             "in", "europe", ",", ".", "(", ")", "1999", "x"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    max_length = 16
    passages = [Passage("a", "The river flows north.", "Paris"),
                Passage("b", "Berlin is a capital in Europe, " * 5, "Berlin (city)"),  # truncated text
                Passage("c", "  the city of rivers  ", ""),  # untitled: the text alone
                Passage("d", "x 1999", "the capital of the river city")]
    ours = tokenizer([format_passage(p, "{title}{sep}{text}", tokenizer.sep_token) for p in passages],
                     truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    dpr = [tokenizer.encode(p.title, text_pair=p.text.strip(), add_special_tokens=True, max_length=max_length,
                            truncation=True) if p.title else
           tokenizer.encode(p.text.strip(), add_special_tokens=True, max_length=max_length, truncation=True)
           for p in passages]
    assert ours == dpr
    assert ours[0].count(tokenizer.sep_token_id) == 2 and len(ours[1]) == max_length
    with pytest.raises(ValueError, match="separator"):
        format_passage(passages[0], "{title}{sep}{text}", "")


@pytest.mark.parametrize("gzipped", [False, True])
def test_passage_offsets_recorded_while_encoding_find_the_passages_by_seeking(tmp_path, gzipped):
    """Two processes encode a corpus (a header, a bad line skipped); the offsets they record give the same
    passages as a streaming pass, and a store still being encoded is not used."""
    import gzip

    from umr_jax.data.readers import lookup_passages
    lines = ["id\ttext\ttitle\n"] + [f"p{i}\ttext {i} é\ttitle {i}\n" for i in range(23)]
    lines[7] = "broken line\n"
    corpus = tmp_path / ("corpus.tsv.gz" if gzipped else "corpus.tsv")
    data = "".join(lines).encode()
    corpus.write_bytes(gzip.compress(data) if gzipped else data)
    store = EmbeddingStore(str(tmp_path / "emb"))
    encode_corpus(fake_encode, file_chunks(str(corpus), 4, 1, 2, "skip"), store.directory, process_index=1,
                  process_count=2)
    assert not store_is_complete(store, 2) and store.passage_offsets() is None  # half encoded: never used
    encode_corpus(fake_encode, file_chunks(str(corpus), 4, 0, 2, "skip"), store.directory, process_index=0,
                  process_count=2)
    assert store_is_complete(store, 2) and store.load_ids() == store.load()[0]
    offsets = store.passage_offsets()
    assert len(offsets.hashes) == 22
    wanted = ["p21", "p0", "p12", "p5"]
    by_seeking = lookup_passages(str(corpus), wanted, offsets=offsets)
    assert by_seeking == lookup_passages(str(corpus), wanted, on_error="skip", chunk_size=3)
    assert by_seeking["p12"].title == "title 12" and by_seeking["p12"].text == "text 12 é"
    with pytest.raises(KeyError, match="recorded"):
        lookup_passages(str(corpus), ["p6"], offsets=offsets)  # p6 was the skipped line
    for npy in (tmp_path / "emb").glob("chunk-??????.npy"):
        npy.unlink()  # the embeddings deleted to save disk: the offsets still serve lookups
    assert lookup_passages(str(corpus), wanted, offsets=store.passage_offsets()) == by_seeking


def test_passage_offsets_resolve_hash_collisions_by_reading_the_ids(tmp_path):
    from umr_jax.data.readers import PassageOffsets, lookup_passages, passage_id_hashes
    corpus = _corpus(tmp_path, 5)
    with open(corpus) as f:
        line_starts = np.cumsum([len(x) + 1 for x in f.read().splitlines()])[:-1]  # after the header
    collided = PassageOffsets.build(np.repeat(passage_id_hashes(["p3"]), 5), line_starts)  # 5 lines, one hash
    found = lookup_passages(corpus, ["p3"], offsets=collided)
    assert {k: (v.text, v.offset) for k, v in found.items()} == {"p3": ("text 3", line_starts[3])}


def test_a_saved_index_is_reused_without_reading_the_embeddings(tmp_path):
    """Resuming at the index stage reads the ids alone: the ScaNN index holds its data, and an exact index
    is rebuilt from the store (no second copy of the embeddings is ever written)."""
    from umr_jax.search import load_or_build_index
    corpus, out = _corpus(tmp_path, 10), str(tmp_path / "emb")
    store = encode_corpus(fake_encode, file_chunks(corpus, 4, 0, 1, "raise"), out)
    mesh = sharding.make_mesh((1, 1), devices=__import__("jax").devices()[:1])
    for backend in ("exact", "scann"):  # the exact one first: the ScaNN check deletes the embeddings
        cfg = index.default_config()
        cfg.backend = backend
        directory = str(tmp_path / backend)
        ids, built = load_or_build_index(store, directory, cfg, mesh, k=3)
        expected = built.search(fake_encode(["title 2 text 2"]), 3).indices
        assert ids[expected[0, 0]] == "p2"
        if backend == "exact":
            assert os.listdir(directory) == ["index.json"]
            reused = load_or_build_index(store, directory, cfg, mesh, k=3)
        else:
            for chunk in range(3):
                os.remove(os.path.join(out, f"chunk-{chunk:06d}.npy"))  # gone: the reuse must not need them
            reused = load_or_build_index(store, directory, cfg, mesh, k=3)
        assert reused[0] == ids
        np.testing.assert_array_equal(reused[1].search(fake_encode(["title 2 text 2"]), 3).indices, expected)
