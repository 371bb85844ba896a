"""Where the official dataset files come from, and reading prepared TFDS splits back.

The builders never bundle data. Each official file is taken from a local copy when
one is configured (an argument, else an environment variable such as
`UMR_XOR_TYDI_DIR`), because our machines are often offline; otherwise it is
downloaded from its official URL through the TFDS download manager, which checks
it against `checksums.tsv`. Local copies are checked against the same sha256, so
a truncated or edited copy fails here with its name rather than later as odd
counts. When neither works, the error names the file, the URL and the setting to
use, which is all a user needs to fix it.

A quick connectivity probe (one HEAD request with a timeout) runs before the TFDS
download: TFDS retries unreachable hosts with backoff for minutes and has no
timeout, which would make an offline run look hung.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

TFDS_DIR_ENV = "UMR_TFDS_DIR"
PROBE_TIMEOUT_SECONDS = 10.0

Downloader = Callable[[str], os.PathLike[str] | str]


class DataUnavailableError(FileNotFoundError):
    """An official file is neither in the local directory nor downloadable."""


class ChecksumMismatchError(ValueError):
    """A file's content differs from the registered official file."""


@dataclasses.dataclass(frozen=True)
class OfficialFile:
    """One file as its publisher names and hosts it."""

    name: str
    url: str


def local_directory(local_dir: str | os.PathLike[str] | None, env_var: str) -> Path | None:
    """The directory to look in for local copies: the argument, else `env_var`, else none."""
    named_by = "local_dir" if local_dir not in (None, "") else env_var
    chosen = local_dir if local_dir not in (None, "") else os.environ.get(env_var) or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser()
    # A directory the user names must exist, even when TFDS has prepared the
    # data already and would never read it: a typo must not pass unnoticed.
    if not path.is_dir():
        raise FileNotFoundError(f"{named_by}={chosen}: no such directory (it should hold local copies of the "
                                "official files)")
    return path


def tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> str | None:
    """TFDS data directory: the argument, else `UMR_TFDS_DIR`, else TFDS's own default (None)."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(TFDS_DIR_ENV) or None
    return os.fspath(Path(chosen).expanduser()) if chosen is not None else None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so large files do not sit in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def registered_sha256(url_infos: Mapping[str, Any] | None, url: str) -> str | None:
    """The sha256 registered in a builder's `checksums.tsv` for `url`, if any."""
    info = (url_infos or {}).get(url)
    return None if info is None else info.checksum


def check_sha256(path: Path, file: OfficialFile, expected: str | None) -> None:
    """Raises ChecksumMismatchError when `path` is not byte-identical to the official file."""
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{file.name}: {path} has sha256 {actual}, but the official file {file.url} has {expected}; "
            "replace it with an unmodified copy of the official file"
        )


def probe_url(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """Fails fast (OSError) when the host of `url` cannot be reached at all.

    Only connectivity is tested; HTTP status codes are left to the real download,
    which reports them itself.
    """
    requests.head(url, timeout=timeout, allow_redirects=True).close()


def tfds_downloader(dl_manager: tfds.download.DownloadManager) -> Downloader:
    """A downloader that probes the host, then downloads through TFDS (checksum-verified)."""

    def download(url: str) -> os.PathLike[str]:
        probe_url(url)
        return dl_manager.download(url)

    return download


def resolve_file(
    file: OfficialFile,
    *,
    local_dir: Path | None,
    env_var: str,
    sha256: str | None,
    download: Downloader | None,
) -> Path:
    """Path to a verified copy of `file`: the local copy if present, else a download.

    Raises:
      ChecksumMismatchError: the local copy or the download differs from the official file.
      DataUnavailableError: no local copy and the download failed (or was not possible).
    """
    if local_dir is not None:
        candidate = local_dir / file.name
        if candidate.is_file():
            check_sha256(candidate, file, sha256)
            return candidate
        where = f"not found in {local_dir}"
    else:
        where = f"has no local copy (neither local_dir= nor {env_var} is set)"
    if download is None:
        cause = "no downloader was given"
    else:
        try:
            path = Path(download(file.url))
        except NonMatchingChecksumError as err:
            raise ChecksumMismatchError(
                f"{file.name}: the download from {file.url} failed its checksum: {err}"
            ) from err
        except (OSError, tfds.download.DownloadError) as err:
            cause = f"{type(err).__name__}: {err}"
        else:
            check_sha256(path, file, sha256)
            return path
    raise DataUnavailableError(
        f"{file.name} {where} and {file.url} could not be downloaded ({cause}); "
        f"put a copy there or set {env_var} / pass local_dir="
    )


class OfficialFilesBuilder(tfds.core.GeneratorBasedBuilder):
    """A TFDS builder whose inputs are official files: local copy first, else a checked download.

    Subclasses set `LOCAL_DIR_ENV` and call `self.resolve(dl_manager, file)`.
    """

    LOCAL_DIR_ENV = ""
    HOMEPAGE = ""
    LICENSE = ""
    DESCRIPTION = ""
    CITATION = ""

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """A file in this package, so TFDS finds `checksums.tsv` beside the builders.

        TFDS's own lookup imports `importlib_resources`, which it does not install
        on Python >= 3.9; pointing at a module file directly avoids that.
        """
        return epath.Path(__file__)

    def __init__(self, *, local_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        """`local_dir` (else the LOCAL_DIR_ENV variable) holds local copies of the official files."""
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._local_dir = local_directory(local_dir, self.LOCAL_DIR_ENV)
        self._original_state["local_dir"] = local_dir  # so pickled builders keep it

    def features(self) -> dict[str, Any]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION,
                                     features=tfds.features.FeaturesDict(self.features()),
                                     homepage=self.HOMEPAGE, citation=self.CITATION, license=self.LICENSE,
                                     disable_shuffling=True)

    def resolve(self, dl_manager: tfds.download.DownloadManager, file: OfficialFile) -> Path:
        return resolve_file(file, local_dir=self._local_dir, env_var=self.LOCAL_DIR_ENV,
                            sha256=registered_sha256(self.url_infos, file.url), download=tfds_downloader(dl_manager))


def _decoded(value: Any) -> Any:
    """TFDS Text features come back as bytes (lists of bytes for sequences); make them str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return _decoded(value.tolist())
    if isinstance(value, list | tuple):
        return [_decoded(v) for v in value]
    return value


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, Any]]:
    """All examples of a prepared split, in stored order, with text decoded to str."""
    if split not in builder.info.splits:
        raise ValueError(
            f"{builder.name}/{builder.builder_config.name} has no split {split!r}; it has {sorted(builder.info.splits)}"
        )
    source = builder.as_data_source(split)
    return [_decoded(example) for example in source.__getitems__(range(len(source)))]
