"""What a run tells its user: TensorBoard scalars, a metrics JSON per round, a PNG of dev metrics by round."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from absl import logging

from umr_jax import atomic
from umr_jax.evaluate import AVERAGE


class Scalars:
    """TensorBoard event files (tensorboardX: no TensorFlow); a no-op on processes other than 0."""

    def __init__(self, directory: str, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(directory, flush_secs=30)

    def __call__(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:  # TensorBoard tags cannot hold '@' (map@20 -> map_at_20)
            self._writer.add_scalar(tag.replace("@", "_at_"), value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
    names = list(next(iter(table.values())))
    lines = ["lang  " + " ".join(f"{n:>14}" for n in names)]
    lines += [f"{lang:<5} " + " ".join(f"{row[n]:14.4f}" for n in names) for lang, row in table.items()]
    return "\n".join(lines)


def plot_rounds(path: str, tables: Sequence[Mapping[str, Mapping[str, float]]], title: str) -> None:
    """Macro-averaged dev metrics (one line each) against the round number; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = list(range(len(tables)))
    names = [n for n in tables[0][AVERAGE] if not n.startswith("same_lang")]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in names:
        ax.plot(rounds, [t[AVERAGE][name] for t in tables], marker="o", label=name)
    ax.set_xlabel("UMR round (0 = initial retriever)")
    ax.set_xticks(rounds)
    ax.set_ylabel("dev metric (macro average over languages)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    logging.info("wrote %s", os.path.abspath(path))
