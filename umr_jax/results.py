"""Result tables of finished UMR runs, recomputed from their files, with paired-bootstrap intervals.

    python -m umr_jax.results --workdir=/tmp/umr-xquad-r [--ablation=/tmp/umr-k8 ...] \
        [--seed_run=/tmp/umr-xquad-r-seed1 ...] --out=docs/results-tables.md

Every figure comes from a run's own files -- `round-r/run-dev.jsonl`, the
teacher rerank runs of `round-0`, `manifest.json` -- and the task rebuilt from
its `config.json` (same split, same judgements), so the tables can be
regenerated at any time and nothing is typed by hand. Differences between two
systems are paired by query: the interval resamples the dev queries (each
weighted so that every language counts the same, as in the macro average) and
recomputes the difference of macro averages.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax.traverse_util import flatten_dict

from umr_jax import atomic, cli, run_files, storage, tasks
from umr_jax.data.readers import Query
from umr_jax.evaluate import AVERAGE, by_language
from umr_jax.workdir import CONFIG, MANIFEST

PerQuery = Mapping[str, Mapping[str, float]]
MEASURES = ("map@20", "recall@1", "recall@10", "recall@100", "mrr@10", "same_lang@20")
COMPARED = ("map@20", "recall@10", "recall@100", "mrr@10", "same_lang@20")


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(after: Mapping[str, float], before: Mapping[str, float], langs: Mapping[str, str], *,
                     clusters: Mapping[str, str] | None = None, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """Difference of macro averages (after - before) with a percentile bootstrap interval.

    Resampling units are clusters of queries (`clusters`: query id -> cluster
    id; default: every query its own). XQuAD-R's dev questions are
    translations of each other, so a question's 11 languages resample together
    -- treating them as independent would make the interval too narrow. Each
    resample averages the paired differences per language, then over languages.
    """
    if set(after) != set(before):
        raise ValueError(f"paired bootstrap: the two systems were scored on different queries "
                         f"({len(set(after) ^ set(before))} differ)")
    ids = sorted(after)
    clusters = clusters or {q: q for q in ids}
    cluster_ids = {c: i for i, c in enumerate(sorted({clusters[q] for q in ids}))}
    lang_ids = {lang: i for i, lang in enumerate(sorted({langs[q] for q in ids}))}
    sums = np.zeros((len(cluster_ids), len(lang_ids)))
    counts = np.zeros_like(sums)
    for q in ids:
        c, lang = cluster_ids[clusters[q]], lang_ids[langs[q]]
        sums[c, lang] += after[q] - before[q]
        counts[c, lang] += 1

    def macro_mean(weights: np.ndarray) -> np.ndarray:  # weights: (..., clusters) draw counts
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean((weights @ sums) / (weights @ counts), axis=-1)

    mean = float(macro_mean(np.ones(len(cluster_ids))))
    draws = np.random.default_rng(seed).multinomial(len(cluster_ids), np.full(len(cluster_ids), 1 / len(cluster_ids)),
                                                    size=resamples)
    low, high = np.nanpercentile(macro_mean(draws.astype(np.float64)), [50 * (1 - level), 50 * (1 + level)])
    return Interval(mean, float(low), float(high))


def column(per_query: PerQuery, measure: str) -> dict[str, float]:
    return {q: values[measure] for q, values in per_query.items()}


# ----------------------------------------------------------------------------- a finished run


class FinishedRun:
    """A UMR workdir read back: its config, stage times, task and per-query dev metrics."""

    def __init__(self, workdir: str):
        path = os.path.join(workdir, CONFIG)
        if not storage.exists(path):
            raise FileNotFoundError(f"{workdir}: no {CONFIG}; is this a umr_jax.main workdir?")
        self.dir = workdir
        self.cfg = ml_collections.ConfigDict(atomic.read_json(path))
        self.manifest = atomic.read_json(os.path.join(workdir, MANIFEST))
        self.task = tasks.build_task(self.cfg.task, self.cfg.data, int(self.cfg.seed))
        self.langs = {q.id: q.lang for q in self.task.dev_queries}
        group = self.task.query_group
        self.clusters = {q.id: group(q.id) for q in self.task.dev_queries} if group else None
        self.rounds = [r for r in range(int(self.cfg.rounds) + 1) if f"round-{r}/evaluate" in self.manifest["stages"]]

    def seconds(self, stage: str) -> float | None:
        entry = self.manifest["stages"].get(stage)
        return None if entry is None else float(entry["seconds"])

    def read(self, name: str) -> list[run_files.Ranking]:
        return run_files.read_jsonl(os.path.join(self.dir, name))

    def per_query(self, rankings: Sequence[run_files.Ranking], queries: Sequence[Query] | None = None) -> PerQuery:
        return self.task.score_queries(rankings, self.task.dev_queries if queries is None else queries)

    def round_per_query(self, r: int) -> PerQuery:
        return self.per_query(self.read(f"round-{r}/run-dev.jsonl"))

    def differs_from(self, other: FinishedRun) -> dict[str, object]:
        """Config keys whose values differ from `other`'s (besides paths)."""
        mine, theirs = flatten_dict(self.cfg.to_dict(), sep="."), flatten_dict(other.cfg.to_dict(), sep=".")
        return {k: v for k, v in sorted(mine.items()) if theirs.get(k) != v and not k.endswith("_dir")}


# ----------------------------------------------------------------------------- tables


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x: object) -> str:
        return f"{x:.4f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def averages_table(systems: Sequence[tuple[str, PerQuery]], langs: Mapping[str, str],
                   measures: Sequence[str] = MEASURES) -> str:
    rows = []
    for label, per_query in systems:
        avg = by_language(per_query, langs)[AVERAGE]
        rows.append([label, *[avg[m] for m in measures if m in avg]])
    present = [m for m in measures if m in by_language(systems[0][1], langs)[AVERAGE]]
    return markdown(["system (macro average)", *present], rows)


def language_table(systems: Sequence[tuple[str, PerQuery]], langs: Mapping[str, str], measure: str) -> str:
    tables = [(label, by_language(pq, langs)) for label, pq in systems]
    columns = list(tables[0][1])
    return markdown([f"{measure}", *columns], [[label, *[t[c][measure] for c in columns]] for label, t in tables])


def measured(per_query: PerQuery, measures: Sequence[str]) -> list[str]:
    """The measures a task reports (XQuAD-R has recall@100 and same_lang@20, synthetic does not)."""
    names = next(iter(per_query.values()), {})
    return [m for m in measures if m in names]


def differences_table(pairs: Sequence[tuple[str, PerQuery, PerQuery]], langs: Mapping[str, str],
                      clusters: Mapping[str, str] | None, measures: Sequence[str] = COMPARED) -> str:
    measures = measured(pairs[0][1], measures) if pairs else list(measures)
    rows = []
    for label, after, before in pairs:
        cells = []
        for m in measures:
            interval = paired_bootstrap(column(after, m), column(before, m), langs, clusters=clusters)
            cells.append(f"{interval}{' *' if interval.excludes_zero else ''}")
        rows.append([label, *cells])
    return markdown(["difference (macro average)", *[f"Δ {m} [95% CI]" for m in measures]], rows)


# ----------------------------------------------------------------------------- the teacher rerank


def combine(student: run_files.Ranking, reranked: run_files.Ranking, k: int, weight: float,
            teacher_temperature: float, student_scale: float) -> run_files.Ranking:
    """The top k by weight * teacher + (1 - weight) * student, each a log-softmax over the k as in distillation."""
    from scipy.special import log_softmax

    teacher_score = dict(zip(reranked.passage_ids[:k], reranked.scores[:k], strict=True))
    ids = list(student.passage_ids[:k])
    t = teacher_temperature * np.array([teacher_score[p] for p in ids])
    s = student_scale * np.array(student.scores[:k], np.float64)

    mixed = weight * log_softmax(t) + (1 - weight) * log_softmax(s)
    order = np.argsort(-mixed, kind="stable")
    return run_files.Ranking(student.query_id, student.lang, [ids[i] for i in order] + list(student.passage_ids[k:]),
                             [float(mixed[i]) for i in order] + list(student.scores[k:]))


def rerank_section(run: FinishedRun) -> str:
    student = run.read("round-0/run-dev-student.jsonl")
    reranked = run.read("round-0/run-dev-rerank.jsonl")
    queries = [Query(x.query_id, "", x.lang) for x in student]
    k = int(run.cfg.rerank.k)
    t, s = float(run.cfg.train.temperature), float(run.cfg.train.student_scale)
    langs = {q.id: q.lang for q in queries}
    systems = [("student (e5, zero-shot)", run.per_query(student, queries)),
               (f"teacher reranks the student's top {k}", run.per_query(reranked, queries))]
    for weight in (0.25, 0.5, 0.75):
        mixed = [combine(a, b, k, weight, t, s) for a, b in zip(student, reranked, strict=True)]
        systems.append((f"{weight} teacher + {1 - weight} student", run.per_query(mixed, queries)))
    measures = ("map@20", "recall@1", "recall@10", "mrr@10", "same_lang@20")
    per_lang = len(queries) // max(len(set(langs.values())), 1)
    return "\n\n".join([
        f"### The teacher reranks the initial retriever's top {k}\n\n"
        f"{len(queries)} held-out questions ({per_lang} parallel questions per language). Only the top {k} "
        f"change places; mixtures combine log_softmax({t:g} x teacher) and log_softmax({s:g} x student) over the "
        f"{k}, the two distributions distillation matches.",
        averages_table(systems, langs, measures),
        language_table(systems[:2], langs, "map@20"),
        differences_table([(label, pq, systems[0][1]) for label, pq in systems[1:]], langs, run.clusters,
                          ("map@20", "recall@1", "mrr@10")),
    ])


# ----------------------------------------------------------------------------- the report


def rounds_section(run: FinishedRun) -> str:
    per_round = {r: run.round_per_query(r) for r in run.rounds}
    label = {0: "round 0 (zero-shot)", **{r: f"after round {r}" for r in run.rounds[1:]}}
    systems = [(label[r], per_round[r]) for r in run.rounds]
    pairs = [(f"round {r} - round 0", per_round[r], per_round[0]) for r in run.rounds[1:]]
    pairs += [(f"round {r} - round {r - 1}", per_round[r], per_round[r - 1]) for r in run.rounds[2:]]
    by_language = [language_table(systems, run.langs, m)
                   for m in measured(per_round[0], ("map@20", "recall@100", "same_lang@20"))]
    return "\n\n".join([
        f"### UMR rounds on all {len(run.langs)} held-out questions",
        averages_table(systems, run.langs),
        *by_language,
        "Paired differences (95% percentile bootstrap, 10,000 resamples of "
        + ("questions with all their translations" if run.clusters else "queries")
        + "; * = the interval excludes 0):",
        differences_table(pairs, run.langs, run.clusters),
    ])


def ablation_section(main_run: FinishedRun, ablations: Sequence[FinishedRun]) -> str:
    rows, pairs, versus_main = [], [], []
    zero, main_after = main_run.round_per_query(0), main_run.round_per_query(1)
    for run in [main_run, *ablations]:
        if run.rounds[0] != 0 or len(run.rounds) < 2:
            raise ValueError(f"{run.dir}: needs rounds 0 and 1 evaluated")
        if run.langs != main_run.langs:
            raise ValueError(f"{run.dir}: its dev queries differ from {main_run.dir}'s")
        after = run.round_per_query(1)
        avg = by_language(after, run.langs)[AVERAGE]
        teacher_s = run.seconds("round-1/teacher")
        rows.append([f"k = {run.cfg.k}", run.manifest["stages"]["round-1/teacher"]["info"].get("pairs", ""),
                     f"{teacher_s:.0f} s" if teacher_s is not None else "",
                     *[avg.get(m, "") for m in ("map@20", "recall@100", "same_lang@20")]])
        pairs.append((f"k = {run.cfg.k}: round 1 - round 0", after, zero))
        if run is not main_run:
            versus_main.append((f"round 1: k = {run.cfg.k} - k = {main_run.cfg.k}", after, main_after))
    order = np.argsort([int(r[0].split("= ")[1]) for r in rows])
    return "\n\n".join([
        "### The effect of k (one round; everything else as above)",
        markdown(["teacher top-k", "teacher pairs", "teacher time", "map@20", "recall@100", "same_lang@20"],
                 [rows[i] for i in order]),
        differences_table([pairs[i] for i in order] + versus_main, main_run.langs, main_run.clusters),
    ])


def seed_mean(per_queries: Sequence[PerQuery]) -> PerQuery:
    """Per query and measure, the mean over runs that differ only in their seed."""
    return {q: {m: float(np.mean([pq[q][m] for pq in per_queries])) for m in per_queries[0][q]}
            for q in per_queries[0]}


def seeds_section(runs: Sequence[FinishedRun]) -> str:
    """Zero-shot against the last round of runs that differ only in `seed` (training order, dropout): each
    seed's paired interval, their spread, and per language the seed mean against zero-shot."""
    for run in runs[1:]:
        other = {k: v for k, v in run.differs_from(runs[0]).items() if k != "seed"}
        if other or run.langs != runs[0].langs:
            raise ValueError(f"{run.dir}: differs from {runs[0].dir} in more than the seed: {other or 'dev queries'}")
    last = min(run.rounds[-1] for run in runs)
    if last < 1 or any(run.rounds[0] != 0 for run in runs):
        raise ValueError("the seed runs need round 0 and at least one trained round evaluated")
    zero = runs[0].round_per_query(0)
    zeros = [run.round_per_query(0) for run in runs[1:]]
    same_zero = all(by_language(z, run.langs) == by_language(zero, run.langs) for z, run in zip(zeros, runs[1:],
                                                                                                strict=True))
    finals = [run.round_per_query(last) for run in runs]
    firsts = [run.round_per_query(1) for run in runs] if last > 1 else []
    mean = seed_mean(finals)
    langs, clusters = runs[0].langs, runs[0].clusters
    seeds = [int(run.cfg.seed) for run in runs]
    systems = [("round 0 (zero-shot)", zero)]
    systems += [(f"seed {s}: after round 1", pq) for s, pq in zip(seeds, firsts, strict=True)]
    systems += [(f"seed {s}: after round {last}", pq) for s, pq in zip(seeds, finals, strict=True)]
    systems.append((f"mean of the {len(runs)} seeds' round-{last} scores", mean))
    pairs = [(f"seed {s}: round {last} - round 0", pq, zero) for s, pq in zip(seeds, finals, strict=True)]
    pairs.append((f"seed mean: round {last} - round 0", mean, zero))
    measures = measured(zero, COMPARED)
    rounds = ([("round 1", seed_mean(firsts))] if firsts else []) + [(f"round {last}", mean)]
    if firsts:
        pairs.insert(-1, ("seed mean: round 1 - round 0", rounds[0][1], zero))
        systems.insert(-1, (f"mean of the {len(runs)} seeds' round-1 scores", rounds[0][1]))
    spread_rows = []
    for name, per_seed in ([("round 1", firsts)] if firsts else []) + [(f"round {last}", finals)]:
        for m in measures:
            gains = [by_language(pq, langs)[AVERAGE][m] - by_language(zero, langs)[AVERAGE][m] for pq in per_seed]
            spread_rows.append([name, m, f"{np.mean(gains):+.4f}",
                                f"{np.std(gains, ddof=1):.4f}" if len(gains) > 1 else "",
                                f"{min(gains):+.4f}", f"{max(gains):+.4f}"])
    per_lang_rows = []
    for lang in sorted(set(langs.values())):
        ids = {q for q, lg in langs.items() if lg == lang}

        def only(pq: PerQuery, ids: set[str] = ids) -> dict[str, float]:
            return {q: v["map@20"] for q, v in pq.items() if q in ids}
        sub_langs = {q: langs[q] for q in ids}
        sub_clusters = {q: clusters[q] for q in ids} if clusters else None
        row: list[object] = [lang, float(np.mean(list(only(zero).values())))]
        for _, pq in rounds:
            interval = paired_bootstrap(only(pq), only(zero), sub_langs, clusters=sub_clusters)
            row += [float(np.mean(list(only(pq).values()))), f"{interval}{' *' if interval.excludes_zero else ''}"]
        gains = [float(np.mean([pq[q]["map@20"] - zero[q]["map@20"] for q in ids])) for pq in finals]
        per_lang_rows.append([*row, f"{min(gains):+.4f} / {max(gains):+.4f}", sum(g > 0 for g in gains)])
    lang_header = ["language", "zero-shot"]
    for name, _ in rounds:
        lang_header += [f"{name} (seed mean)", f"Δ {name} [95% CI]"]
    return "\n\n".join([
        f"### Seeds: zero-shot against round {last} ({len(runs)} runs that differ only in the seed: "
        f"{', '.join(map(str, seeds))})",
        "The seed sets the batch order and dropout; the split, the training queries and the zero-shot retriever "
        "are the same in every run (round 0 is " + ("identical in all of them" if same_zero else
                                                    "NOT identical across them; the first run's is used") + ").",
        averages_table(systems, langs),
        "Paired differences (95% percentile bootstrap, 10,000 resamples of "
        + ("questions with all their translations" if clusters else "queries")
        + "; * = the interval excludes 0):",
        differences_table(pairs, langs, clusters),
        "Spread over seeds of each round's gain over zero-shot (macro average):",
        markdown(["round", "measure", "mean gain", "std over seeds", "smallest", "largest"], spread_rows),
        "mAP@20 per query language: zero-shot, the seed mean of each round with its paired interval against "
        f"zero-shot (within the language), and for round {last} the smallest and largest gain of a single seed and "
        "how many seeds gained:",
        markdown([*lang_header, f"round-{last} seed gains (min / max)", "seeds > 0"], per_lang_rows),
    ])


def times_section(runs: Sequence[FinishedRun]) -> str:
    order = ("encode", "index", "retrieve", "evaluate", "rerank", "teacher", "train")

    def chronological(run: FinishedRun) -> list[str]:
        def key(stage: str) -> tuple[int, int]:
            if "/" not in stage:
                return (1 << 30, 0)  # export
            r, name = stage.split("/")
            r = int(r.removeprefix("round-"))
            return (r - 1, order.index(name)) if name in ("teacher", "train") else (r, order.index(name))
        return sorted(run.manifest["stages"], key=key)

    stages = list(dict.fromkeys(s for run in runs for s in chronological(run)))
    header = ["stage", *[f"{os.path.basename(run.dir.rstrip('/'))}" for run in runs]]
    rows = [[s, *[f"{run.seconds(s):.1f} s" if run.seconds(s) is not None else "" for run in runs]] for s in stages]
    rows.append(["total", *[f"{sum(v['seconds'] for v in run.manifest['stages'].values()) / 60:.1f} min"
                            for run in runs]])
    return "### Wall time of every stage\n\n" + markdown(header, rows)


def build_report(workdir: str, ablation_dirs: Sequence[str] = (), seed_dirs: Sequence[str] = ()) -> str:
    run = FinishedRun(workdir)
    ablations = [FinishedRun(d) for d in ablation_dirs]
    seed_runs = [FinishedRun(d) for d in seed_dirs]
    parts = [f"<!-- generated by: python -m umr_jax.results --workdir={workdir}"
             + "".join(f" --ablation={d}" for d in ablation_dirs)
             + "".join(f" --seed_run={d}" for d in seed_dirs) + " -->",
             f"## Tables ({run.task.name}: {len(run.task.train_queries)} training queries, "
             f"{len(run.task.dev_queries)} dev queries, {len(run.task.passages or ())} candidates)",
             rounds_section(run)]
    if "round-0/rerank" in run.manifest["stages"]:
        parts.append(rerank_section(run))
    for other in ablations:
        logging.info("%s differs from %s in %s", other.dir, workdir, json.dumps(other.differs_from(run)))
    if ablations:
        parts.append(ablation_section(run, ablations))
    if seed_runs:
        parts.append(seeds_section([run, *seed_runs]))
    parts.append(times_section([run, *ablations, *seed_runs]))
    return "\n\n".join(parts) + "\n"


def define_flags() -> None:
    """Flags exist only when this module is the program: importing it (xquad_r_qa, tests) defines none."""
    flags.DEFINE_string("workdir", None, "The main run's workdir.", required=True)
    flags.DEFINE_multi_string("ablation", [], "Workdirs of one-round runs that vary k.")
    flags.DEFINE_multi_string("seed_run", [], "Workdirs of runs that differ from --workdir only in "
                              "`seed`: zero-shot against the last round, with the spread over seeds.")
    flags.DEFINE_string("out", "", "Markdown file to write ('' = print).")


@cli.reports_user_errors("umr_jax.results")
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    text = build_report(f.workdir, f.ablation, f.seed_run)
    if f.out:
        with atomic.atomic_open(f.out, "w") as out:
            out.write(text)
        logging.info("wrote %s", f.out)
    else:
        print(text)


if __name__ == "__main__":
    cli.run("umr_jax.results", main, define_flags)
