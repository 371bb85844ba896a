"""Memory and disk of UMR's stages as the corpus grows: the rounds binary on synthetic corpora of 250k and 2M passages.

    python bench/scale.py                        # 250,000 and 2,000,000 passages (see docs/scale.md for times)
    python bench/scale.py --sizes=20000,100000   # a quick look

For each size it writes a seeded synthetic corpus in DPR's TSV format (`id text
title`, ~100 words a passage in seven scripts: multilingual-looking text from
Zipf-distributed made-up words), training queries and judged dev queries (a few
words of one passage each), then runs `python -m umr_jax.main
--config=configs/scale.py` on it as a child process: every stage of a UMR round
(encode, ScaNN index, retrieve, evaluate, teacher scoring, training, then the
next round's encode, index, retrieve, evaluate) with small random models, so
32-dimensional float32 embeddings. While it runs, the child's resident memory
(VmRSS) is sampled every 50 ms and its bytes written (/proc/<pid>/io) read at
every stage boundary, which its log announces ("stage X: starting").

Printed: per size and stage the wall time, the peak RSS and the bytes written;
then per size the whole run's peak RSS (the kernel's high-water mark for the
child) and the workdir's size. The last line is

    scale_rss_bytes_per_passage: X = (peak RSS at the largest size - at the smallest) / (size difference)

The project's target is at most 512 bytes a passage: embeddings, ids and the
index may be resident, passage text must never be.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from common import REPO, machine

SCRIPTS = {  # language: syllable inventory of its script (made-up words, realistic byte widths)
    "en": "ba be bi bo bu ca ce ci co da de di do fa fe fi ga ge go ha he hi la le li lo ma me mi mo na ne ni no "
          "pa pe pi ra re ri ro sa se si so ta te ti to va ve vi wa we ya",
    "de": "ba be bä bi bo bö bu bü da de di dö fa fe fü ga ge gö ha he hü ka ke kö la le lü ma me mö na ne nü "
          "ra re rö sa se sü ta te tö scha sche schü",
    "ru": "ба бе би бо бу ва ве ви во да де ди до за зе зи ка ке ки ко ла ле ли ло ма ме ми мо на не ни но па пе "
          "пи по ра ре ри ро са се си со та те ти то",
    "ar": "با بي بو تا تي تو ثا جا جي حا حي خا دا دي را ري زا سا سي شا صا ضا طا ظا عا غا فا في قا كا كي لا لي "
          "ما مي نا ني ها هي وا وي يا",
    "hi": "क का कि की कु के को ग गा गि ज जा जि त ता ति ती द दा दि न ना नि प पा पि ब बा म मा मि र रा रि ल ला "
          "लि स सा सि ह हा हि",
    "el": "βα βε βι γα γε δα δε δι ζα θα θε κα κε κι λα λε λι μα με μι να νε νι πα πε πι ρα ρε ρι σα σε σι τα "
          "τε τι φα φε χα",
    "th": "กา กิ ขา คา งา จา ฉา ชา ซา ดา ตา ถา ทา นา บา ปา ผา พา ฟา มา ยา รา ลา วา สา หา อา ฮา กี ดี ตี นี มี",
}
VOCAB_PER_LANGUAGE = 8000


def _vocabularies(rng: np.random.Generator) -> dict[str, np.ndarray]:
    vocab = {}
    for lang, syllables in SCRIPTS.items():
        syl = np.array(syllables.split())
        words = set()
        while len(words) < VOCAB_PER_LANGUAGE:
            n = int(rng.integers(1, 5))
            words.add("".join(syl[rng.integers(0, len(syl), n)]))
        vocab[lang] = np.array(sorted(words), dtype=object)
    return vocab


def write_corpus(directory: str, size: int, seed: int, train_queries: int, dev_queries: int) -> dict[str, str]:
    """corpus.tsv, queries.jsonl (training and dev) and qrels.tsv in `directory`, reused if already complete."""
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f) for name, f in
             (("corpus", "corpus.tsv"), ("queries", "queries.jsonl"), ("qrels", "qrels.tsv"))}
    marker = os.path.join(directory, "done.json")
    spec = {"size": size, "seed": seed, "train_queries": train_queries, "dev_queries": dev_queries}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                return paths
    rng = np.random.default_rng(seed)
    vocab = _vocabularies(rng)
    langs = sorted(vocab)
    zipf = 1.0 / np.arange(1, VOCAB_PER_LANGUAGE + 1) ** 1.07
    zipf /= zipf.sum()
    picked = np.sort(rng.choice(size, train_queries + dev_queries, replace=False))
    order = rng.permutation(len(picked))
    query_rows = {int(picked[i]): ("dev" if j < dev_queries else "train") for j, i in enumerate(order)}
    queries, qrels = [], []
    start = time.perf_counter()
    with open(paths["corpus"] + ".tmp", "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        block = 50_000
        for lo in range(0, size, block):
            n = min(block, size - lo)
            passage_langs = rng.integers(0, len(langs), n)
            lengths = rng.integers(80, 121, n)
            words = rng.choice(VOCAB_PER_LANGUAGE, size=(n, 123), p=zipf)
            lines = []
            for i in range(n):
                v = vocab[langs[passage_langs[i]]]
                text = v[words[i, :lengths[i]]]
                title = " ".join(v[words[i, 120:123]])
                pid = str(lo + i + 1)
                lines.append(f"{pid}\t{' '.join(text)}\t{title}\n")
                if lo + i in query_rows:
                    cut = int(rng.integers(0, lengths[i] - 8))
                    qid = f"q{lo + i + 1}"
                    queries.append({"_id": qid, "text": " ".join(text[cut:cut + 8]), "lang": langs[passage_langs[i]]})
                    if query_rows[lo + i] == "dev":
                        qrels.append(f"{qid}\t{pid}\t1\n")
            f.writelines(lines)
    os.replace(paths["corpus"] + ".tmp", paths["corpus"])
    with open(paths["queries"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in queries)
    with open(paths["qrels"], "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(qrels)
    with open(marker, "w") as f:
        json.dump(spec, f)
    print(f"  wrote {size:,} passages ({os.path.getsize(paths['corpus']) / 1e6:,.0f} MB) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return paths


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def _write_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
    except (OSError, StopIteration):
        return 0


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def run_umr(paths: dict[str, str], workdir: str, log_path: str, extra_flags: list[str]) -> dict:
    """The rounds binary on one corpus, its memory sampled; per stage: seconds, peak RSS, bytes written."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "umr_jax.main", f"--config={REPO / 'configs' / 'scale.py'}", f"--workdir={workdir}",
           f"--config.data.corpus={paths['corpus']}", f"--config.data.queries={paths['queries']}",
           f"--config.data.qrels={paths['qrels']}", *extra_flags]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    env.pop("XLA_FLAGS", None)  # the binary's own device setup, as a user runs it
    stages: list[dict] = [{"stage": "start-up", "start": time.perf_counter(), "rss": 0, "written_before": 0}]
    last = {"written": 0}
    lock = threading.Lock()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.PIPE, text=True)

        def follow_log() -> None:
            for line in proc.stderr:
                log.write(line)
                m = re.search(r"stage (\S+): starting", line)
                if m:
                    with lock:
                        stages.append({"stage": m.group(1), "start": time.perf_counter(), "rss": 0,
                                       "written_before": _write_bytes(proc.pid)})

        reader = threading.Thread(target=follow_log, daemon=True)
        reader.start()
        peak_hwm = 0
        while True:  # wait4: the child's own rusage (its kernel-counted peak RSS) when it ends
            done, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if done:
                break
            rss = _status_kb(proc.pid, "VmRSS") * 1024
            peak_hwm = max(peak_hwm, _status_kb(proc.pid, "VmHWM") * 1024)
            written = _write_bytes(proc.pid)
            with lock:
                stages[-1]["rss"] = max(stages[-1]["rss"], rss)
                last["written"] = max(last["written"], written)
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=10)
    end = time.perf_counter()
    if proc.returncode:
        sys.exit(f"umr_jax.main failed (exit {proc.returncode}); its log: {log_path}")
    for i, s in enumerate(stages):
        following = stages[i + 1] if i + 1 < len(stages) else {"start": end, "written_before": last["written"]}
        s["seconds"] = following["start"] - s["start"]
        s["written"] = max(0, following["written_before"] - s.pop("written_before"))
    peak = max(peak_hwm, usage.ru_maxrss * 1024)
    return {"stages": stages, "peak_rss": peak, "workdir_bytes": _du(workdir), "seconds": end - stages[0]["start"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="250000,2000000", help="corpus sizes, comma-separated, smallest first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_queries", type=int, default=256)
    parser.add_argument("--dev_queries", type=int, default=64)
    parser.add_argument("--data_dir", default="/tmp/umr-scale/data", help="generated corpora (reused across runs)")
    parser.add_argument("--workdir", default="/tmp/umr-scale/run", help="the runs' workdirs (deleted first)")
    parser.add_argument("--json_out", default="", help="write every figure here as JSON")
    parser.add_argument("--flag", action="append", default=[], help="an extra flag for umr_jax.main (repeatable)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {machine('float32')}", flush=True)
    results = {}
    for size in sizes:
        print(f"corpus of {size:,} passages:", flush=True)
        paths = write_corpus(os.path.join(args.data_dir, str(size)), size, args.seed, args.train_queries,
                             args.dev_queries)
        result = run_umr(paths, os.path.join(args.workdir, str(size)), os.path.join(args.data_dir, f"{size}.log"),
                         args.flag)
        results[size] = result
        print(f"  {'stage':24s} {'seconds':>8s} {'peak RSS MB':>12s} {'written MB':>11s}")
        for s in result["stages"]:
            print(f"  {s['stage']:24s} {s['seconds']:8.1f} {s['rss'] / 1e6:12.0f} {s['written'] / 1e6:11.1f}")
        print(f"  whole run: {result['seconds']:.0f} s, peak RSS {result['peak_rss'] / 1e6:,.0f} MB, workdir "
              f"{result['workdir_bytes'] / 1e6:,.0f} MB ({result['workdir_bytes'] / size:,.0f} bytes a passage)",
              flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine("float32"), "sizes": {str(k): v for k, v in results.items()}}, f, indent=1)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        per_passage = (results[hi]["peak_rss"] - results[lo]["peak_rss"]) / (hi - lo)
        print(f"growth from {lo:,} to {hi:,} passages, per passage (bytes):")
        for a, b in zip(results[lo]["stages"], results[hi]["stages"], strict=True):
            print(f"  {a['stage']:24s} peak RSS {(b['rss'] - a['rss']) / (hi - lo):8.0f}   "
                  f"written {(b['written'] - a['written']) / (hi - lo):8.0f}")
        print(f"  workdir size {(results[hi]['workdir_bytes'] - results[lo]['workdir_bytes']) / (hi - lo):,.0f}")
        print(f"scale_rss_bytes_per_passage: {per_passage:.0f}")


if __name__ == "__main__":
    main()
