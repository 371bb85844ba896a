"""What a run tells its user: TensorBoard scalars, a metrics JSON per round, a PNG of dev metrics by round."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from absl import logging

from umr_jax import atomic, storage
from umr_jax.evaluate import AVERAGE


class _BucketEventFile:
    """An event file on a bucket, written through umr_jax.storage: each flush uploads the whole file again as
    one object (tensorboardX's own gs:// writer would need google-cloud-storage and bypass the layer)."""

    def __init__(self, url: str):
        self.url, self.buffer, self.dirty = url, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            with atomic.atomic_open(self.url, "wb") as f:
                f.write(self.buffer.getvalue())
            self.dirty = False

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory for a URL scheme."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # a bucket has no directories to make


class Scalars:
    """TensorBoard event files (tensorboardX: no TensorFlow); a no-op on processes other than 0."""

    def __init__(self, directory: str, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter
            if storage.is_remote(directory):
                from tensorboardX import record_writer
                record_writer.register_writer_factory(directory.split("://", 1)[0], _BucketEventFiles())
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
    logging.info("wrote %s", storage.resolve(path))
