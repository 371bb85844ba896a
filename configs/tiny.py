"""Random tiny models on synthetic text: every stage of two UMR rounds in well under 2 minutes on a CPU.

    python -m umr_jax.main --config=configs/tiny.py --workdir=/tmp/umr-tiny

The test suite runs it end to end (tests/test_main.py). Its metrics mean
nothing -- a random retriever, a random teacher -- its point is that every code
path of a real run (chunked encoding, exact search, chunked teacher scoring,
sharded training with Orbax checkpoints, export) runs and resumes.
"""

from umr_jax import run_config


def get_config():
    cfg = run_config.default_config()
    cfg.task = "synthetic"
    cfg.rounds = 2
    cfg.k = 8
    cfg.eval_k = 20
    cfg.data.num_passages = 96
    cfg.data.num_train_queries = 32
    cfg.data.num_dev_queries = 16
    cfg.retriever = run_config.e5_small()
    cfg.retriever.checkpoint = "random"  # e5's tokenizer, random 2-layer x 32 encoder
    cfg.retriever.max_query_length = 32
    cfg.retriever.max_passage_length = 64
    cfg.retriever.pack_row_lengths = (64,)
    cfg.encode.chunk_size = 40  # several chunks: the unit of resumption
    cfg.teacher = run_config.gemma3_270m()
    cfg.teacher.checkpoint = "random"  # the packaged Gemma tokenizer, random 2-layer x 32 decoder
    cfg.teacher.param_dtype = cfg.teacher.dtype = "float32"
    cfg.teacher.max_input_length = 96
    cfg.teacher.max_target_length = 32
    cfg.teacher.pack_row_lengths = (128,)
    cfg.teacher_chunk = 96  # 32 queries x k=8 = 256 pairs: three chunks
    cfg.train.queries_per_batch = 8
    cfg.train.passages_per_query = 4
    cfg.train.epochs = 1.0
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 1
    cfg.train.student_scale = 20.0
    cfg.train.query_buckets = (32,)
    cfg.train.pack_row_length = 64  # the retriever's max_passage_length: passages packed into rows of it
    cfg.train.checkpoint_every = 2
    return cfg
