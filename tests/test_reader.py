"""The reader: mGEN's input format, prompt truncation, batching invariance, and the resumable read stage."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import run_kill_chain, run_tiny
from umr_jax import generate, reader, sharding
from umr_jax.batching import pad_rows
from umr_jax.models import gemma_weights
from umr_jax.models.gemma import Gemma3Config


def test_mgen_input_is_cora_s_source_line():
    # Built by following convert_dpr_retrieval_results_to_seq2seq.py (load_dpr_results, split="dev",
    # then the --add_lang write): "<{idx}: {title}> " + text per passage, a space between passages
    # unless the context already ends with one, newlines removed from the whole line.
    passages = [reader.Context("Kenya", "Nairobi is the capital.\nIt is large."),
                reader.Context("Nairobi", "A city ending in a space "),
                reader.Context("", "Third.")]
    expected = ("<Q>: Mji mkuu wa Kenya ni upi? [sw] <P>:<0: Kenya> Nairobi is the capital.It is large. "
                "<1: Nairobi> A city ending in a space <2: > Third.")
    assert reader.mgen_input("Mji mkuu wa Kenya ni upi?", "sw", passages) == expected
    assert reader.mgen_input("Q?", "ja", []) == "<Q>: Q? [ja] <P>:"


def test_mgen_preset_decodes_as_eval_mgen():
    cfg = reader.mgen("/models/mGEN_model")
    assert (cfg.k, cfg.num_beams, cfg.max_new_tokens, cfg.early_stopping) == (15, 4, 19, False)
    assert (cfg.model, cfg.input_format) == ("mt5", "mgen")
    reader.validate_config(cfg)


@pytest.mark.parametrize("key,value,message", [
    ("input_format", "chat", "choose one of"), ("model", "bert", "choose 'gemma3' or 'mt5'"),
    ("prompt_template", "{passages} only", "lacks the field {question}"), ("num_beams", 0, "must be positive"),
    ("input_format", "mgen", "does not fit"), ("mesh_shape", (1, 2, 4), "must be \\(data, model\\)")])
def test_bad_reader_config_is_named(key, value, message):
    cfg = reader.default_config()
    cfg[key] = value
    with pytest.raises(ValueError, match=message):
        reader.validate_config(cfg)


def test_reader_mesh_that_does_not_fit_the_devices_is_named(eight_devices):
    cfg = reader.default_config()
    cfg.checkpoint = "random"
    cfg.mesh_shape = (3, -1)
    with pytest.raises(ValueError, match=r"read.mesh_shape=\(3, -1\)"):
        reader.Reader.from_config(cfg, sharding.make_mesh((8, 1)))


@pytest.fixture(scope="module")
def tiny_reader(eight_devices):
    cfg = reader.default_config()
    cfg.checkpoint = "random"
    cfg.param_dtype = cfg.dtype = "float32"
    cfg.max_new_tokens = 6
    cfg.max_input_tokens = 48
    cfg.batch_size = 4
    cfg.length_multiple = 16
    tokenizer = gemma_weights.load_tokenizer(gemma_weights.default_gguf_path())
    model = gemma_weights.build_gemma(Gemma3Config(vocab_size=len(tokenizer), **cfg.random), seed=3)
    return reader.Reader(model, tokenizer, cfg, sharding.make_mesh((2, 4)))


def test_prompt_truncation_drops_last_passages_then_cuts_and_keeps_the_question(tiny_reader):
    long = reader.Context("", "word " * 200)
    short = [reader.Context("", "Nairobi is the capital of Kenya."), reader.Context("", "Second passage.")]
    ids = tiny_reader.input_ids("What is the capital of Kenya?", "en", short)
    text = tiny_reader.tokenizer.decode(ids)
    assert text.startswith("<bos>Nairobi is the capital of Kenya.\nSecond passage.\n\nQuestion: What is")
    assert text.endswith("Answer:")
    cut = tiny_reader.input_ids("What is the capital of Kenya?", "en", [long, *short])
    assert len(cut) <= 48
    decoded = tiny_reader.tokenizer.decode(cut)
    assert "Question: What is the capital of Kenya?\nAnswer:" in decoded and "Second passage" not in decoded
    with pytest.raises(ValueError, match="cannot hold question"):
        tiny_reader.input_ids("word " * 60 + "?", "en", short)


def test_answers_do_not_depend_on_batch_company(tiny_reader):
    """The stop token ends answers, padding rows and lengths change nothing, answers come back in order."""
    questions = [f"Question number {i} about {'x ' * i}?" for i in range(7)]
    contexts = [[reader.Context("", f"Passage {i} says {'y ' * (3 * i)}.")] for i in range(7)]
    together = tiny_reader.answer(questions, ["en"] * 7, contexts, progress=False)
    alone = [tiny_reader.answer([q], ["en"], [c], progress=False)[0] for q, c in zip(questions, contexts, strict=True)]
    assert together == alone
    # The same as one direct generate call on that question, decoded.
    ids, mask = pad_rows([tiny_reader.input_ids(questions[3], "en", contexts[3])], 1, 48, 0)
    out = nnx.jit(generate.generate, static_argnums=3)(tiny_reader.model, jnp.asarray(ids), jnp.asarray(mask),
                                                       tiny_reader.settings)
    tokens = np.asarray(out.tokens)[0, :int(out.lengths[0])]
    assert together[3] == tiny_reader.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    # Newlines stop generation: an answer is one line.
    assert all("\n" not in a for a in together)
    assert set(tiny_reader.settings.eos_ids) >= {1, *tiny_reader._newline_ids()}


READ_FLAGS = ("--config.read.k=3", "--config.read.checkpoint=random", "--config.read.dtype=float32",
              "--config.read.param_dtype=float32", "--config.read.max_new_tokens=4", "--config.read.chunk=6",
              "--config.read.batch_size=8", "--config.rounds=0", "--config.export=False")


def test_read_stage_resumes_after_a_kill(tmp_path):
    reference = tmp_path / "reference"
    done = run_tiny(reference, *READ_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (reference / "read" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["passages"]) == 3 for r in rows)
    ranking = json.loads((reference / "round-0" / "run-dev.jsonl").read_text().splitlines()[0])
    assert rows[0]["passages"] == ranking["passages"][:3]  # the final round's top k, in rank order

    workdir = tmp_path / "killed"
    run_kill_chain(workdir, [("read.chunk_committed", "read")], lambda env: run_tiny(workdir, *READ_FLAGS, env=env))
    first = (workdir / "read" / "chunk-000000.json").stat().st_mtime_ns
    done = run_tiny(workdir, *READ_FLAGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "read" / "chunk-000000.json").stat().st_mtime_ns == first  # kept, not redone
    assert (workdir / "read" / "answers.jsonl").read_text() == (reference / "read" / "answers.jsonl").read_text()


def test_missing_mgen_directory_is_one_line_before_any_model(tmp_path):
    from helpers import tiny_config
    from umr_jax import main

    cfg = tiny_config()
    cfg.read = reader.mgen(str(tmp_path / "mGEN_model"))
    with pytest.raises(FileNotFoundError, match=r"--config.read.checkpoint=.*mGEN_model: no such model directory"):
        main.validate(cfg)
    cfg.read.k = 0  # no read stage: the reader's checkpoint is not looked at
    main.validate(cfg)


def test_xquad_r_answer_texts_come_from_the_official_files(shared_data, monkeypatch):
    from umr_jax.data.xquad_r import answer_texts

    gold = answer_texts(str(shared_data / "xquad-r"), ["de", "zh"])
    assert len(gold) == 2 * 1190
    assert gold["de:56beb4343aeaaa14008c925b"] == "308"  # "Wie viele Punkte gab die Verteidigung der Panthers ab?"
    monkeypatch.delenv("UMR_XQUAD_R_DIR", raising=False)
    assert answer_texts(None, ["de"]) is None  # no local copy named: the read stage writes unscored answers
