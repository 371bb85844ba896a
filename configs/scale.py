"""The memory simulation of bench/scale.py: UMR's stages at corpus sizes of millions, with small random models.

    python bench/scale.py        # generates the corpora and runs this config on each

Everything that grows with the corpus is as at paper scale (a DPR TSV corpus read
in committed chunks, ScaNN over every passage, passage lookups for the teacher,
training and R@kt-style readers); the models are random and small (a 2-layer x 32
encoder, so 32-dimensional float32 embeddings, and a 2-layer x 32 teacher), so
that the run measures the pipeline's memory and disk, not model compute. The data
paths come from flags (bench/scale.py sets them):

    --config.data.corpus=corpus.tsv --config.data.queries=queries.jsonl --config.data.qrels=qrels.tsv
"""

from umr_jax import run_config


def get_config():
    cfg = run_config.default_config()
    cfg.task = "files"
    cfg.rounds = 1
    cfg.k = 8
    cfg.eval_k = 20
    cfg.data.languages = ()
    cfg.data.measures = ("recall@20", "mrr@10")
    cfg.retriever = run_config.e5_small()
    cfg.retriever.checkpoint = "random"  # e5's tokenizer, random 2-layer x 32 encoder: 32-d embeddings
    cfg.retriever.dtype = "float32"
    cfg.retriever.max_query_length = 32
    cfg.retriever.max_passage_length = 64
    cfg.retriever.pack_row_lengths = (64,)
    cfg.retriever.tokens_per_batch = 16384
    cfg.encode.chunk_size = 100_000  # as configs/xor.py
    cfg.encode.passage_template = "{title}{sep}{text}"  # DPR's text pair, as configs/xor.py
    cfg.index.backend = "scann"
    cfg.teacher = run_config.gemma3_270m()
    cfg.teacher.checkpoint = "random"  # the packaged Gemma tokenizer, random 2-layer x 32 decoder
    cfg.teacher.param_dtype = cfg.teacher.dtype = "float32"
    cfg.teacher.max_input_length = 160
    cfg.teacher.max_target_length = 32
    cfg.teacher.pack_row_lengths = (256,)
    cfg.teacher_chunk = 1024
    cfg.rerank.queries_per_language = 0
    cfg.train.queries_per_batch = 8
    cfg.train.passages_per_query = 4
    cfg.train.epochs = 1.0
    cfg.train.learning_rate = 1e-4
    cfg.train.warmup_steps = 1
    cfg.train.query_buckets = (32,)
    cfg.train.pack_row_length = 64
    cfg.train.checkpoint_every = 16
    cfg.export = False
    return cfg
