"""bench/cost_model.py: known answers for its FLOP, parameter and memory arithmetic, and an end-to-end run.

No JAX needed: the cost model is plain arithmetic over bench/measured.json.
"""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cost_model.py"
MEASURED = REPO / "bench" / "measured.json"


def _load():
    spec = importlib.util.spec_from_file_location("cost_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cm = _load()


def test_bert_base_forward_flops_by_hand():
    # per layer: 2 n (4 h^2 + 2 h f) + 4 n^2 h, with h = 768, f = 3072, n = 128; 12 layers
    projections = 2 * 128 * (4 * 768 * 768 + 2 * 768 * 3072)  # 2 * 128 * 7,077,888 = 1,811,939,328
    attention = 4 * 128 * 128 * 768  # 50,331,648
    assert projections == 1_811_939_328 and attention == 50_331_648
    assert cm.MBERT.forward_flops(128) == 12 * (1_811_939_328 + 50_331_648) == 22_347_251_712
    assert cm.MBERT.forward_flops(128, 10) == 10 * 22_347_251_712


def test_mbert_parameter_count():
    # transformers' BertModel(BertConfig(vocab_size=119547)) has 177,853,440 parameters, 590,592 of them
    # in the pooler (768 x 768 + 768), which mean-pooling towers do not have.
    assert cm.MBERT.params() == 177_853_440 - 590_592 == 177_262_848


def test_mbert_shape_is_bert_config_default():
    transformers = pytest.importorskip("transformers")
    c = transformers.BertConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.max_position_embeddings, c.type_vocab_size) == (cm.MBERT.hidden, cm.MBERT.layers, cm.MBERT.heads,
                                                              cm.MBERT.ffn, cm.MBERT.max_positions,
                                                              cm.MBERT.type_vocab)
    assert cm.MBERT.vocab == 119_547  # bert-base-multilingual-cased's vocabulary


def test_mt5_xl_parameter_count_by_hand():
    d, f, v = 2048, 5120, 250_112
    enc_layer = 4 * d * d + 3 * d * f + 2 * d  # q, k, v, o (32 x 64 = 2048), gated FFN, 2 RMS norms
    dec_layer = 8 * d * d + 3 * d * f + 3 * d  # + cross-attention, 3 RMS norms
    total = 2 * v * d + 24 * enc_layer + 24 * dec_layer + 2 * d + 2 * 32 * 32  # embeddings, untied head, ...
    assert total == 3_742_619_648 == cm.MT5_XL.params()
    assert cm.MT5_XL.params() * 2 / 1e9 == pytest.approx(7.485, abs=1e-3)  # bfloat16 GB: fits one 32 GiB chip


def test_t5_pair_flops_tiny_shape_by_hand():
    t5 = cm.T5(vocab=10, d_model=2, d_ff=3, enc_layers=1, dec_layers=1, heads=1, d_kv=2)
    # s = 4 input, t = 2 target tokens; h = inner = 2, f = 3
    enc = 2 * 4 * (4 * 2 * 2 + 3 * 2 * 3) + 4 * 4 * 4 * 2  # 272 + 128
    dec = 2 * 2 * (6 * 2 * 2 + 3 * 2 * 3) + 4 * 4 * 2 * 2 + 2 * 2 * 3 * 2 + 4 * 2 * 4 * 2  # 168 + 64 + 24 + 64
    head = 2 * 2 * 2 * 10
    assert (enc, dec, head) == (400, 320, 80)
    assert t5.pair_flops(4, 2) == 800


def test_training_step_is_three_forwards_of_both_towers():
    w = cm.default_workload(1000)
    forward = (cm.MBERT.forward_flops(w.train_passage_padded, 16 * 16)
               + cm.MBERT.forward_flops(w.train_query_padded, 16) + 2 * 16 * 256 * 768)
    assert cm.train_step_flops(cm.MBERT, w) == pytest.approx(3 * forward, rel=1e-12)
    assert w.train_steps == 9219  # ceil(10 epochs x (15,250 - 500 held out) queries / 16)
    assert w.rank_evaluations == 40  # every ceil(14,750 / 16 / 4) = 231 steps (39 times) and at the last
    assert w.teacher_pairs == 1_525_000 and w.encodings == 3


def test_adamw_memory_is_three_times_float32_parameters():
    m = cm.adamw_bytes(1_000_000)
    assert m["params"] == 4_000_000
    assert m["adam_moments"] == 2 * m["params"]
    assert m["params_and_adamw"] == 3 * 4_000_000
    assert m["grads"] == m["params"]


def test_sharding_replicates_a_vocabulary_the_axis_does_not_divide():
    assert cm.shard(120, 119_547, 4) == 120  # 119,547 % 4 != 0: replicated
    assert cm.shard(120, 250_112, 4) == 30
    per_device = cm.encoder_params_per_device(cm.MBERT, 4)
    layers = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert per_device == pytest.approx(cm.MBERT.params() - layers * 3 / 4)
    assert cm.t5_params_per_device(cm.MT5_XL, 1) == cm.MT5_XL.params()
    assert cm.t5_params_per_device(cm.MT5_XL, 4) == pytest.approx(cm.MT5_XL.params() / 4, rel=1e-3)


def test_scann_defaults_and_sizes_at_18m():
    assert cm.scann_params(18_000_000, 100) == {"num_leaves": 4243, "leaves_to_search": 128, "reorder": 1000,
                                                "training_sample_size": 250_000, "dims_per_block": 2}
    s = cm.sizes(cm.default_workload(18_000_000))
    assert s["embeddings_f32"] == 18_000_000 * 768 * 4
    assert s["embeddings_f16"] == s["embeddings_f32"] / 2
    assert s["scann_ah_codes"] == 18_000_000 * 384 / 2  # 4 bits per block of 2 dims


def test_flop_convention_reproduces_measured_encode_gflops():
    check = cm.flop_convention_check(cm.load_measured(MEASURED))
    assert check["model_gflops"] == pytest.approx(check["measured_gflops"], rel=0.02)


def test_doubling_utilisation_halves_compute_time():
    measured = cm.load_measured(MEASURED)
    w = cm.default_workload(18_000_000)
    slow = cm.evaluate(cm.MBERT, cm.MT5_XL, w, measured, 0.25, 4)
    fast = cm.evaluate(cm.MBERT, cm.MT5_XL, w, measured, 0.5, 4)
    for key in ("tpu_v4_32", "8xh100"):
        for stage in ("encode", "teacher", "train", "search"):
            assert slow["platforms"][key]["stages"][stage]["compute_seconds"] == pytest.approx(
                2 * fast["platforms"][key]["stages"][stage]["compute_seconds"], rel=1e-12)
        # the only terms that do not scale are the memory-bound AdamW update and search traffic
        ratio = slow["platforms"][key]["total_seconds"] / fast["platforms"][key]["total_seconds"]
        assert 1.8 < ratio <= 2.0


def test_time_is_flops_over_chips_peak_utilisation():
    measured = cm.load_measured(MEASURED)
    w = cm.default_workload(18_000_000)
    r = cm.evaluate(cm.MBERT, cm.MT5_XL, w, measured, 0.5, 4)
    executed = r["flops_per_run"]["encode"]["executed"]
    assert r["platforms"]["tpu_v4_32"]["stages"]["encode"]["seconds"] == pytest.approx(
        executed / (16 * 275e12 * 0.5))
    assert r["platforms"]["8xh100"]["stages"]["teacher"]["seconds"] == pytest.approx(
        r["flops_per_run"]["teacher"]["executed"] / (8 * 989e12 * 0.5))


def test_measured_figures_are_documented_and_written_in_the_benchmarks_page():
    doc = json.loads(MEASURED.read_text("utf-8"))
    readme = (REPO / "docs" / "benchmarks.md").read_text("utf-8")
    for f in doc["figures"]:
        assert {"name", "value", "unit", "command", "date"} <= f.keys(), f
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", f["date"]), f
        assert f["command"].startswith("python bench/"), f
        v = f["value"]
        written = {f"{v:,.0f}", f"{v:,.1f}", f"{v:,.2f}"} if v != int(v) else {f"{int(v):,}", f"{v:.2f}"}
        assert any(re.search(rf"(?<![\d.,]){re.escape(s)}(?![\d])", readme) for s in written), (
            f"{f['name']} = {v} is not written in docs/benchmarks.md")


def test_end_to_end(tmp_path):
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(SCRIPT), f"--json_out={out}"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    name, value = re.fullmatch(r"([a-z0-9_]+): ([0-9.]+)", lines[-1]).groups()
    assert name == "paper_scale_hours_tpu_v4_32"
    result = json.loads(out.read_text())
    assert float(value) == pytest.approx(result["headline"][name], abs=1e-3)
    assert 0 < float(value) < 1000
    assert "proxy" in done.stdout and "ASSUMPTION train_mfu_equals_encode_bf16_mfu" in done.stdout
    assert "### Cloud TPU v4-32" in done.stdout and "### 8 x H100 SXM 80 GB" in done.stdout
    for platform in result["platforms"].values():
        assert all(m["fits"] for m in platform["memory"].values())

    halved = subprocess.run([sys.executable, str(SCRIPT), "--utilisation_override=0.1"], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert "--utilisation_override=0.1" in halved.stdout
    assert float(halved.stdout.strip().splitlines()[-1].split(": ")[1]) > float(value)


def test_bad_arguments_fail_with_a_message(tmp_path):
    missing = subprocess.run([sys.executable, str(SCRIPT), f"--measured={tmp_path / 'nope.json'}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope.json: not found" in missing.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--utilisation_override=1.5"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "utilisation_override" in bad.stderr
