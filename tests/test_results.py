"""Result tables: the paired bootstrap's known answers and invariants, score mixing, a report of the tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umr_jax import results, run_files
from umr_jax.evaluate import by_language


def _langs(n: int, counts=(("de", 0.5), ("en", 0.3), ("zh", 0.2))) -> dict[str, str]:
    out, start = {}, 0
    for lang, share in counts:
        size = round(share * n)
        out.update({f"q{i}": lang for i in range(start, start + size)})
        start += size
    return out


def test_a_constant_shift_is_a_point_interval():
    langs = _langs(100)
    before = {q: float(i % 7) / 7 for i, q in enumerate(langs)}
    interval = results.paired_bootstrap({q: v + 0.05 for q, v in before.items()}, before, langs)
    assert interval.mean == pytest.approx(0.05) and interval.low == pytest.approx(0.05)
    assert interval.high == pytest.approx(0.05)


def test_the_difference_is_of_macro_averages_and_pairing_narrows_it():
    rng = np.random.default_rng(0)
    langs = _langs(400)  # unequal languages: a plain mean over queries would weigh de most
    base = {q: float(v) for q, v in zip(langs, rng.uniform(0, 1, size=len(langs)), strict=True)}
    lift = {"de": 0.0, "en": 0.02, "zh": 0.10}
    after = {q: base[q] + lift[langs[q]] + float(rng.normal(0, 0.01)) for q in langs}
    interval = results.paired_bootstrap(after, base, langs)
    macro_after = by_language({q: {"m": v} for q, v in after.items()}, langs)["avg"]["m"]
    macro_before = by_language({q: {"m": v} for q, v in base.items()}, langs)["avg"]["m"]
    assert interval.mean == pytest.approx(macro_after - macro_before)
    assert interval.low < interval.mean < interval.high and interval.excludes_zero
    # Unpaired, the spread of `base` (sd 0.29) would swamp a 0.04 lift; paired it is ~0.01 wide.
    assert interval.high - interval.low < 0.01
    # Seeded: the same call gives the same interval.
    assert results.paired_bootstrap(after, base, langs) == interval
    with pytest.raises(ValueError, match="different queries"):
        results.paired_bootstrap(after, {q: v for q, v in base.items() if q != "q0"}, langs)


def test_no_difference_is_an_interval_around_zero():
    rng = np.random.default_rng(1)
    langs = _langs(300)
    a = {q: float(v) for q, v in zip(langs, rng.uniform(size=len(langs)), strict=True)}
    b = {q: float(v) for q, v in zip(langs, rng.permutation(list(a.values())), strict=True)}
    interval = results.paired_bootstrap(a, b, langs)
    assert interval.low < 0 < interval.high


def test_mixing_weight_one_is_the_teacher_order_and_zero_the_students():
    student = run_files.Ranking("q", "en", ["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.1])
    reranked = run_files.Ranking("q", "en", ["c", "a", "b", "d"], [-1.0, -2.0, -3.0, 0.1])
    assert results.combine(student, reranked, 3, 1.0, 10.0, 100.0).passage_ids == ["c", "a", "b", "d"]
    assert results.combine(student, reranked, 3, 0.0, 10.0, 100.0).passage_ids == ["a", "b", "c", "d"]
    # Half and half: student log-softmax gaps of 10 against teacher gaps of 10 and 20.
    assert results.combine(student, reranked, 3, 0.5, 10.0, 100.0).passage_ids[:3] == ["a", "c", "b"]


def test_report_of_the_tiny_run_matches_its_own_metrics(tiny_run):
    text = results.build_report(str(tiny_run), [str(tiny_run)])
    for r in range(3):
        avg = json.loads((tiny_run / f"round-{r}" / "metrics.json").read_text())["avg"]
        label = "round 0 (zero-shot)" if r == 0 else f"after round {r}"
        assert f"| {label} | {avg['map@20']:.4f} | {avg['recall@1']:.4f} |" in text
    assert "round 2 - round 1" in text and "### The effect of k" in text and "| total |" in text


def test_seed_runs_report_each_seed_the_mean_and_the_spread(tiny_run):
    """The same run given as two seeds: the seed mean is that run, the spread is zero, and per-language gains
    are the run's own; a run that differs in more than the seed is refused."""
    run, again = results.FinishedRun(str(tiny_run)), results.FinishedRun(str(tiny_run))
    text = results.seeds_section([run, again])
    final = json.loads((tiny_run / "round-2" / "metrics.json").read_text())
    zero = json.loads((tiny_run / "round-0" / "metrics.json").read_text())
    assert f"| mean of the 2 seeds' round-2 scores | {final['avg']['map@20']:.4f} |" in text
    assert "round 0 is identical in all of them" in text
    gain = final["avg"]["map@20"] - zero["avg"]["map@20"]
    assert f"| round 2 | map@20 | {gain:+.4f} | 0.0000 | {gain:+.4f} | {gain:+.4f} |" in text
    first = json.loads((tiny_run / "round-1" / "metrics.json").read_text())
    for lang in ("de", "en", "fr"):
        gains = [t[lang]["map@20"] - zero[lang]["map@20"] for t in (first, final)]
        assert (f"| {lang} | {zero[lang]['map@20']:.4f} | {first[lang]['map@20']:.4f} | {gains[0]:+.4f} [" in text
                and f"| {final[lang]['map@20']:.4f} | {gains[1]:+.4f} [" in text)
    again.cfg.k = 4
    with pytest.raises(ValueError, match=r"more than the seed: \{'k': 4\}"):
        results.seeds_section([run, again])


def test_translations_resample_together_and_widen_the_interval():
    rng = np.random.default_rng(2)
    questions = [f"x{i}" for i in range(150)]
    effect = {c: float(v) for c, v in zip(questions, rng.normal(0.02, 0.2, size=len(questions)), strict=True)}
    langs, clusters, after, before = {}, {}, {}, {}
    for lang in ("ar", "de", "zh"):  # the same question moves the same way in every language
        for c in questions:
            q = f"{lang}:{c}"
            langs[q], clusters[q] = lang, c
            before[q] = float(rng.uniform())
            after[q] = before[q] + effect[c] + float(rng.normal(0, 0.01))
    independent = results.paired_bootstrap(after, before, langs)
    grouped = results.paired_bootstrap(after, before, langs, clusters=clusters)
    assert grouped.mean == pytest.approx(independent.mean)
    # Three correlated copies carry one question's worth of evidence: ~sqrt(3) wider.
    ratio = (grouped.high - grouped.low) / (independent.high - independent.low)
    assert 1.4 < ratio < 2.1
