"""KL distillation: the loss against a hand computation, gradients, one step, sharding, resumption."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from helpers import TINY, repo_config
from umr_jax import distill, sharding
from umr_jax.models.bert import BertConfig, BertEncoder, DualEncoder


def reference_loss(q: np.ndarray, p: np.ndarray, scores: np.ndarray, temperature: float, scale: float) -> float:
    """Loops, float64: the official formulation written out."""
    b, n = scores.shape
    total = 0.0
    for i in range(b):
        student = np.array([scale * float(q[i] @ p[j]) for j in range(b * n)])
        student = student - np.log(np.exp(student - student.max()).sum()) - student.max()
        teacher = np.full(b * n, distill.TEACHER_MASK_LOGIT)
        teacher[i * n:(i + 1) * n] = temperature * scores[i]
        teacher = teacher - np.log(np.exp(teacher - teacher.max()).sum()) - teacher.max()
        total += float(np.sum(np.exp(teacher) * (teacher - student)))
    return total / b


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    scores = -rng.uniform(0.5, 3.0, size=(3, 2))
    got = float(distill.distill_loss(q, p, scores, temperature=10.0, student_scale=2.0))
    assert got == pytest.approx(reference_loss(q, p, scores, 10.0, 2.0), rel=1e-5)


def test_loss_of_a_two_passage_example_by_hand():
    # One query, two passages: teacher softmax(10 * [-1, -1.1]) vs student softmax([1, 0]).
    t = np.exp([-10.0, -11.0]) / np.exp([-10.0, -11.0]).sum()
    s = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    expected = float(np.sum(t * np.log(t / s)))
    got = distill.distill_loss(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]]),
                               np.array([[-1.0, -1.1]]), temperature=10.0)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_loss_is_zero_when_the_student_agrees():
    # Student logits equal the teacher's on own passages and other passages far below.
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = np.array([[3.0, -50.0], [1.0, -50.0], [-50.0, 2.0], [-50.0, 0.5]])
    scores = np.array([[0.3, 0.1], [0.2, 0.05]])
    assert float(distill.distill_loss(q, p, scores, temperature=10.0)) == pytest.approx(0.0, abs=1e-6)


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    cfg = distill.default_config()
    cfg.queries_per_batch, cfg.passages_per_query = 8, 2
    cfg.learning_rate, cfg.warmup_steps, cfg.epochs = 1e-3, 2, 3.0
    cfg.query_buckets, cfg.passage_buckets = (8, 16), (16, 32)
    cfg.packing, cfg.pack_row_length, cfg.pack_max_segments = False, 32, 4
    cfg.checkpoint_every = 2
    cfg.update(overrides)
    return cfg


def tiny_dual_encoder(dropout: float = 0.0) -> DualEncoder:
    config = BertConfig(**{**TINY, "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout})
    towers = [BertEncoder(config, pooling="mean", normalize=True, rngs=nnx.Rngs(params=0, dropout=i))
              for i in range(2)]
    return DualEncoder(*towers)


def toy_data(num_queries: int = 8, k: int = 4, seed: int = 0) -> distill.TrainingSet:
    rng = np.random.default_rng(seed)
    tokens = lambda n, lo, hi: [list(rng.integers(5, TINY["vocab_size"], size=rng.integers(lo, hi)))  # noqa: E731
                                for _ in range(n)]
    passages = tokens(num_queries * k, 4, 30)
    return distill.TrainingSet(tokens(num_queries, 3, 12), passages,
                               rng.permutation(len(passages)).reshape(num_queries, k),
                               -rng.uniform(0.5, 3.0, size=(num_queries, k)))


def test_step_selection_covers_every_query_once_per_epoch():
    cfg = tiny_config(queries_per_batch=3)
    seen = np.concatenate([distill.step_selection(7, 4, s, cfg, seed=1)[0] for s in range(7)])  # 21 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    q, picks = distill.step_selection(7, 4, 5, cfg, seed=1)
    q2, picks2 = distill.step_selection(7, 4, 5, cfg, seed=1)
    assert (q == q2).all() and (picks == picks2).all()
    assert all(len(set(row)) == 2 for row in picks)


def _grads(model: DualEncoder, batch: dict, cfg) -> nnx.State:
    def loss(m):
        micro = {k: v[0] for k, v in batch.items()}
        q = m.query(micro["query_ids"], micro["query_mask"])
        p = m.passage(micro["passage_ids"], micro["passage_mask"])
        return distill.distill_loss(q, p, micro["scores"], cfg.temperature, 20.0)
    return nnx.grad(loss)(model)


def test_gradients_reach_both_towers():
    cfg = tiny_config()
    batch = distill.make_batch(toy_data(), 0, cfg, seed=0, pad_id=0)
    grads = _grads(tiny_dual_encoder(), batch, cfg)
    for tower in ("query", "passage"):
        norms = [float(np.abs(g).max()) for g in jax.tree.leaves(grads[tower])]
        assert max(norms) > 0, tower
        # the last layer's FFN output of each tower gets a gradient
        assert float(np.abs(grads[tower]["layers"][1]["ffn"]["wo"][...]).max()) > 0, tower


def test_one_step_lowers_the_loss():
    cfg = tiny_config(warmup_steps=0, student_scale=20.0)
    mesh = sharding.make_mesh((-1, 1))
    model = tiny_dual_encoder()
    batch = distill.make_batch(toy_data(), 0, cfg, seed=0, pad_id=0)
    trainer = distill.Trainer(model, cfg, mesh, total_steps=10, seed=0)
    before = trainer.step(batch, 0)["loss"]
    after = trainer.step(batch, 1)["loss"]  # the loss reported at step 1 is before its update
    assert after < before


def _train_steps(mesh, steps: int, cfg, plan=None) -> np.ndarray:
    model = tiny_dual_encoder(dropout=0.1)
    trainer = distill.Trainer(model, cfg, mesh, total_steps=10, seed=3)
    data = toy_data()
    losses = [trainer.step(distill.make_batch(data, s, cfg, 3, 0, plan), s)["loss"] for s in range(steps)]
    trainer.sync_model()
    return np.array(losses), np.asarray(model.passage.layers[0].ffn.wi[...])


@pytest.mark.parametrize("packing", [False, True])
def test_sharded_step_equals_unsharded(eight_devices, packing):
    cfg = tiny_config(student_scale=20.0, packing=packing)
    one = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
    # One packed shape for both meshes: rows a multiple of the 4 data-parallel devices.
    plan = distill.packing_plan(toy_data(), cfg, 3, 3, multiple_of=4) if packing else None
    losses1, w1 = _train_steps(one, 3, cfg, plan)
    losses8, w8 = _train_steps(sharding.make_mesh((4, 2)), 3, cfg, plan)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    np.testing.assert_allclose(w8, w1, atol=1e-5)


def test_gradient_accumulation_matches_the_mean_of_micro_batch_gradients():
    cfg = tiny_config(accumulation_steps=2, warmup_steps=0)
    mesh = sharding.make_mesh((4, 2))
    batch = distill.make_batch(toy_data(), 0, cfg, seed=0, pad_id=0)
    assert batch["query_ids"].shape[:2] == (2, 4) and batch["passage_ids"].shape[:2] == (2, 8)
    trainer = distill.Trainer(tiny_dual_encoder(), cfg, mesh, total_steps=10, seed=0)
    loss = trainer.step(batch, 0)["loss"]
    model = tiny_dual_encoder()
    parts = []
    for i in range(2):
        micro = {k: v[i] for k, v in batch.items()}
        parts.append(float(distill.distill_loss(model.query(micro["query_ids"], micro["query_mask"]),
                                                model.passage(micro["passage_ids"], micro["passage_mask"]),
                                                micro["scores"], cfg.temperature)))
    assert loss == pytest.approx(np.mean(parts), rel=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_resumed_training_equals_uninterrupted(tmp_path, packing):
    cfg = tiny_config(student_scale=20.0, packing=packing)
    mesh = sharding.make_mesh((-1, 1))
    data = toy_data()
    whole = tiny_dual_encoder(dropout=0.1)
    summary = distill.train(whole, data, cfg, mesh, str(tmp_path / "a"), seed=5, pad_id=0)
    assert summary["steps"] == 3  # 3 epochs x 8 queries / 8 per batch
    interrupted = tiny_dual_encoder(dropout=0.1)
    distill.train(interrupted, data, cfg, mesh, str(tmp_path / "b"), seed=5, pad_id=0, stop_at=2)
    resumed = tiny_dual_encoder(dropout=0.1)  # a fresh process: initial weights, then the checkpoint
    summary = distill.train(resumed, data, cfg, mesh, str(tmp_path / "b"), seed=5, pad_id=0)
    assert summary["resumed_at"] == 2
    for a, b in zip(jax.tree.leaves(nnx.state(whole, nnx.Param)), jax.tree.leaves(nnx.state(resumed, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    restored = tiny_dual_encoder(dropout=0.1)
    distill.restore_final(restored, cfg, mesh, str(tmp_path / "b"), len(data.query_tokens), seed=5)
    np.testing.assert_array_equal(np.asarray(restored.query.layers[1].ffn.wo[...]),
                                  np.asarray(whole.query.layers[1].ffn.wo[...]))


def test_a_nan_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    cfg = tiny_config()
    mesh = sharding.make_mesh((-1, 1))
    data = toy_data()
    distill.train(tiny_dual_encoder(), data, cfg, mesh, str(tmp_path), seed=0, pad_id=0, stop_at=2)
    poisoned = distill.TrainingSet(data.query_tokens, data.passage_tokens, data.candidates, data.scores)
    poisoned.scores[:] = np.inf  # bypasses the constructor's check, as corrupted memory would
    with pytest.raises(distill.NumericFaultError, match="step 2"):
        distill.train(tiny_dual_encoder(), poisoned, cfg, mesh, str(tmp_path), seed=0, pad_id=0)
    assert distill.checkpoint_manager(str(tmp_path), cfg).latest_step() == 2


def test_packed_passages_give_the_padded_embeddings_and_loss():
    data = toy_data()
    padded_cfg, packed_cfg = tiny_config(), tiny_config(packing=True, accumulation_steps=2)
    padded_cfg.accumulation_steps = 2
    padded = distill.make_batch(data, 1, padded_cfg, seed=0, pad_id=0)
    packed = distill.make_batch(data, 1, packed_cfg, seed=0, pad_id=0)
    rows, length = packed["passage_ids"].shape[1:]
    assert length == 32 and rows < padded["passage_ids"].shape[1]  # fewer rows than passages: they share rows
    for key in ("query_ids", "query_mask", "scores"):
        np.testing.assert_array_equal(packed[key], padded[key])
    model = tiny_dual_encoder()
    for i in range(2):
        want = model.passage(padded["passage_ids"][i], padded["passage_mask"][i])
        got = model.passage.packed(packed["passage_ids"][i], packed["passage_segments"][i],
                                   packed["passage_positions"][i], packed_cfg.pack_max_segments)
        got = np.asarray(got).reshape(-1, got.shape[-1])[packed["passage_slots"][i]]
        np.testing.assert_allclose(got, want, atol=1e-5)
        q = model.query(padded["query_ids"][i], padded["query_mask"][i])
        assert float(distill.distill_loss(q, got, packed["scores"][i], 10.0, 20.0)) == pytest.approx(
            float(distill.distill_loss(q, want, padded["scores"][i], 10.0, 20.0)), rel=1e-5)


def test_packing_plan_fits_every_step_and_is_a_multiple_of_the_devices():
    cfg = tiny_config(packing=True, queries_per_batch=4)
    data = toy_data(num_queries=16)
    plan = distill.packing_plan(data, cfg, seed=0, total_steps=12, multiple_of=2)
    assert plan.rows % 2 == 0 and plan.row_length == 32
    for step in range(12):
        batch = distill.make_batch(data, step, cfg, 0, 0, plan)
        assert batch["passage_ids"].shape[1] == plan.rows  # one compiled shape for the whole run
        segments, slots = batch["passage_segments"][0], batch["passage_slots"][0]
        assert len(np.unique(slots)) == len(slots) == 8
        # Every passage's tokens sit whole in its slot's row and segment.
        for j, slot in enumerate(slots):
            row, segment = divmod(int(slot), cfg.pack_max_segments)
            passage = distill._micro_batch_passages(data, step, cfg, 0)[2][0][j]
            assert (segments[row] == segment + 1).sum() == len(data.passage_tokens[passage])
    with pytest.raises(ValueError, match=r"train\.pack_row_length=16 is shorter than a training passage"):
        distill.make_batch(data, 0, tiny_config(packing=True, pack_row_length=16), 0, 0)


def test_training_question_drops_one_ascii_question_mark_only_when_asked():
    cfg = distill.default_config()
    assert distill.training_question("Who wrote it?", cfg) == "Who wrote it?"  # off by default
    cfg.strip_question_mark = True
    # As DPR's normalize_question: one trailing ASCII "?", nothing else.
    assert distill.training_question("Who wrote it?", cfg) == "Who wrote it"
    assert distill.training_question("Why??", cfg) == "Why?"
    assert distill.training_question("من كتبها؟", cfg) == "من كتبها؟"
    assert distill.training_question("誰が書いた？", cfg) == "誰が書いた？"
    assert distill.training_question("What? no", cfg) == "What? no"


def test_the_paper_config_follows_the_official_query_length_question_marks_and_gradient_scale():
    cfg = repo_config("xor")
    assert cfg.retriever.max_query_length == cfg.retriever.max_passage_length == 256
    assert cfg.train.strip_question_mark
    assert cfg.train.grad_scale == 1 / 8 and cfg.train.max_grad_norm == 2.0  # official grad cache, world size 1
    assert cfg.train.select == "average_rank" and cfg.train.evals_per_epoch == 4 and cfg.train.rank_negatives == 30
    assert distill.steps_for(15_250, cfg.train) == 9_219  # 10 epochs of the 14,750 queries not held out, B = 16


def test_grad_scale_before_clipping_equals_clipping_at_the_scaled_threshold():
    """The official grad-cache scale (world_size / 8) then clipping at c is clipping at c * 8 under AdamW."""
    params = {"w": jax.numpy.zeros(4)}
    grads = [{"w": jax.numpy.asarray(v)} for v in ([0.5, 0.5, 0.0, 0.0], [3.0, -4.0, 0.0, 0.0], [0.0, 30.0, 40.0, 0.0])]

    def updates(grad_scale: float, max_norm: float):
        cfg = distill.default_config()
        cfg.update(grad_scale=grad_scale, max_grad_norm=max_norm, adam_eps=1e-12, weight_decay=0.0, warmup_steps=0)
        tx, _ = distill.make_optimizer(cfg, 10)
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params)
            out.append(np.asarray(u["w"]))
        return np.stack(out)

    scaled = updates(0.125, 2.0)
    np.testing.assert_allclose(scaled, updates(1.0, 16.0), rtol=1e-5, atol=1e-12)
    assert not np.allclose(scaled, updates(1.0, 2.0), rtol=1e-3)  # the scale is not ignored
    assert len(distill.make_optimizer(distill.default_config(), 10)[0].init(params)) == 2  # no scale stage at 1.0


def test_the_paper_config_reads_passages_as_dpr_text_pairs():
    assert repo_config("xor").encode.passage_template == "{title}{sep}{text}"


def test_average_rank_by_hand():
    """Two held-out queries, 3 candidates each; pool = each query's teacher top-1 and next 1 candidate."""
    data = distill.TrainingSet([[1], [2]], [[3]] * 5, np.array([[0, 1, 2], [3, 4, 0]]),
                               np.array([[-2.0, -1.0, -3.0], [-1.0, -5.0, -2.0]]))
    # Teacher order: query 0 -> passages 1, 0 (gold 1); query 1 -> passages 3, 0 (gold 3).
    # Pool rows: [1, 0, 3, 0]. Student scores: q0 . p = [0.5, 0.9, -, 0.7, -] -> row scores [0.5, 0.9, 0.7,
    # 0.9]: gold 0.5, three above -> rank 3; q1 row scores [0.1, 0.0, 0.3, 0.0]: gold 0.3, none above -> 0.
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    passages = np.array([[0.9, 0.0], [0.5, 0.1], [0.0, 0.0], [0.7, 0.3], [0.0, 0.0]])
    assert distill.average_rank(queries, passages, data, negatives=1) == 1.5
    # Top-1s alone: pool [1, 3]; q0 scores [0.5, 0.7] -> rank 1; q1 [0.1, 0.3] -> rank 0.
    assert distill.average_rank(queries, passages, data, negatives=0) == 0.5


def test_average_rank_selection_keeps_the_best_weights_and_survives_a_kill(tmp_path):
    """train.select='average_rank': the held-out queries are not trained on, every evaluation is logged, the
    model ends with the weights of the best evaluation (not the last step's), and a run killed in the middle
    selects the same step with identical weights; restore_final gives the selected weights too."""
    cfg = tiny_config(student_scale=20.0, select="average_rank", rank_queries=4, rank_negatives=2,
                      evals_per_epoch=2, epochs=4.0, queries_per_batch=4, learning_rate=5e-3, checkpoint_every=3)
    mesh = sharding.make_mesh((4, 2))  # 4 queries a step over the data axis, towers split over model
    data = toy_data(num_queries=12)
    assert distill.steps_for(12, cfg) == 8  # 4 epochs x (12 - 4 held out) / 4 per batch
    ranks = []

    def log(tag, value, step):
        if tag == "train/average_rank":
            ranks.append((step + 1, value))

    whole = tiny_dual_encoder()
    summary = distill.train(whole, data, cfg, mesh, str(tmp_path / "a"), seed=5, pad_id=0, log_scalars=log)
    assert [s for s, _ in ranks] == [1, 2, 3, 4, 5, 6, 7, 8]  # 8 trained queries / 4 per batch / 2 evals an epoch
    best_step, best_rank = min(ranks, key=lambda x: (x[1], x[0]))
    assert (summary["selected_step"], summary["average_rank"]) == (best_step, best_rank)
    # The kept weights are the ones that ranked best: re-evaluated, they give the logged rank.
    trainer = distill.Trainer(whole, cfg, mesh, 8, seed=5)
    _, heldout = distill.split_heldout(data, cfg, seed=5)
    assert trainer.evaluate_average_rank(heldout, pad_id=0) == best_rank
    interrupted = tiny_dual_encoder()
    distill.train(interrupted, data, cfg, mesh, str(tmp_path / "b"), seed=5, pad_id=0, stop_at=3)
    resumed = tiny_dual_encoder()
    again = distill.train(resumed, data, cfg, mesh, str(tmp_path / "b"), seed=5, pad_id=0)
    assert again["resumed_at"] == 3 and again["selected_step"] == best_step
    restored = tiny_dual_encoder()
    distill.restore_final(restored, cfg, mesh, str(tmp_path / "b"), len(data.query_tokens), seed=5)
    for model in (resumed, restored):
        for a, b in zip(jax.tree.leaves(nnx.state(whole, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param)),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="rank_queries"):
        distill.steps_for(4, cfg)
