"""Shared fixtures-as-functions: a tiny random BERT in PyTorch and in our Flax, torch state dicts, config edits,
and conveniences only tests need on top of the library (whole-file reads, table wrappers, store checks)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import transformers
from flax import nnx

from umr_jax.data.readers import DEFAULT_MAX_LINE_BYTES, OnError, Passage, ReadReport, iter_passage_chunks
from umr_jax.encode import EmbeddingStore
from umr_jax.evaluate import by_language, xor_retrieve_per_query
from umr_jax.models.bert import BertConfig, BertEncoder
from umr_jax.models.bert_weights import load_hf_weights

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)


def tiny_torch_bert(seed: int = 0, **overrides) -> transformers.BertModel:
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**{**TINY, **overrides}), add_pooling_layer=False)
    # Random, non-trivial LayerNorm parameters so they are really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def perturb_norms(model: torch.nn.Module, pattern: str, scale: float) -> torch.nn.Module:
    """Adds scale * N(0, 1) noise (torch's global RNG) to every parameter whose name contains `pattern`.

    Freshly initialised norm weights are all ones (or zeros for 1 + w norms):
    a wrong offset or a swapped norm would go unnoticed without this.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if pattern in name:
                p.add_(scale * torch.randn_like(p))
    return model


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def edit_config(directory: str, **changes) -> None:
    """Updates keys of a saved model's config.json in place."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def ours_from_torch(model: transformers.BertModel, **kwargs) -> BertEncoder:
    cfg = BertConfig.from_hf_dict(model.config.to_dict())
    ours = BertEncoder(cfg, rngs=nnx.Rngs(0), **kwargs)
    load_hf_weights(ours, torch_state(model), "torch reference")
    return ours


def torch_pooled(model: transformers.BertModel, ids: np.ndarray, mask: np.ndarray, pooling: str = "mean",
                 normalize: bool = False) -> np.ndarray:
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = torch.tensor(mask, dtype=h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()


def padded_batch(seed: int = 0, batch: int = 8, length: int = 24, vocab: int = 101):
    """Random ids with rows of different lengths (padding id 0 after the end)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, length + 1, size=batch)
    lengths[0] = length
    ids = rng.integers(5, vocab, size=(batch, length)).astype(np.int32)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


ROOT = pathlib.Path(__file__).resolve().parents[1]


def repo_config(name: str):
    """configs/<name>.py's ConfigDict."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config():
    """configs/tiny.py's ConfigDict."""
    return repo_config("tiny")


def run_tiny(workdir: pathlib.Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """python -m umr_jax.main on the tiny config, as a user runs it (8-device CPU mesh)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "umr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}",
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def recorded_stages(workdir: pathlib.Path) -> dict:
    """The stages a run's manifest.json records, with their entries ({} before the first)."""
    path = workdir / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def run_kill_chain(workdir: pathlib.Path, chain: Sequence[tuple[str, str]],
                   run: Callable[[dict], subprocess.CompletedProcess]) -> dict[str, int]:
    """Runs `run(env)` once per (fault point, stage) of `chain`, each SIGKILLed at its point (UMR_JAX_KILL_AT):
    the killed stage is not recorded and no finished stage is redone. Returns the mtimes (ns) of the first
    chunk that encoding and teacher scoring committed, for the caller to check that the resume kept them."""
    import signal

    from umr_jax import faults

    assert {p for p, _ in chain} <= set(faults.POINTS)
    marks: dict[str, int] = {}
    for point, stage in chain:
        before = recorded_stages(workdir)
        done = run({faults.ENV: point})
        assert done.returncode == -signal.SIGKILL, (point, done.stderr[-3000:])
        after = recorded_stages(workdir)
        assert stage not in after, point  # killed inside the stage: not recorded
        assert {k: v["finished"] for k, v in before.items()} == \
            {k: after[k]["finished"] for k in before}, f"{point}: a finished stage was redone"
        if point == "encode.chunk_committed":
            marks["chunk"] = (workdir / "round-0/embeddings/chunk-000000.json").stat().st_mtime_ns
        if point == "teacher.chunk_committed":
            marks["teacher"] = (workdir / "round-1/teacher/chunk-000000.npy").stat().st_mtime_ns
    return marks


def assert_same_result(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    """A resumed run ends as the uninterrupted one: the same dev metrics, the same exported towers, bit for bit."""
    from safetensors.numpy import load_file

    assert json.loads((workdir / "metrics.json").read_text())["dev"] == \
        json.loads((reference / "metrics.json").read_text())["dev"]
    for tower in ("query", "passage"):
        ours, expected = (load_file(d / "export" / tower / "model.safetensors") for d in (workdir, reference))
        assert ours.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(ours[name], expected[name], err_msg=f"{tower}/{name}")


def read_passages(path: str | os.PathLike, *, on_error: OnError = "raise",
                  max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Passage], ReadReport]:
    """A whole (small) passage file with its merged report: the library only streams chunks."""
    total, passages = ReadReport(str(path)), []
    for _, chunk, report in iter_passage_chunks(path, 1 << 30, on_error=on_error, max_line_bytes=max_line_bytes):
        passages.extend(chunk)
        total.merge(report)
    return passages, total


def xor_retrieve_recall(contexts: Mapping[str, Sequence[str]], answers: Mapping[str, Sequence[str]],
                        langs: Mapping[str, str], k_tokens: Sequence[int] = (2000, 5000),
                        tokenize: Callable[[str], list[str]] | None = None) -> dict[str, dict[str, float]]:
    """R@{k}kt per language and macro average, in percent like the official script."""
    return by_language(xor_retrieve_per_query(contexts, answers, k_tokens, tokenize), langs)


def store_is_complete(store: EmbeddingStore, process_count: int) -> bool:
    """Whether every one of `process_count` processes left its done marker in the store."""
    return all(os.path.exists(os.path.join(store.directory, f"done-{p}-of-{process_count}.json"))
               for p in range(process_count))
