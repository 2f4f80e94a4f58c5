"""Fetch a backbone's ImageNet weights on a connected machine, for use at an air-gapped site.

Hospitals often train on machines without internet access, where ``model.weights: imagenet``
cannot download anything. ``download_weights`` fetches the same ``*_notop.h5`` file Keras would
fetch, checks it, and leaves it in a folder that can be carried across; the air-gapped run then
names it with ``--weights PATH`` (or ``model.weights: PATH``).

Which file and hash Keras wants is not copied from Keras's private tables (they move between
releases and a stale copy would silently point at the wrong file): ``weights_source`` asks the
installed Keras itself, by building the backbone with ``weights="imagenet"`` while
``keras.src.utils.file_utils.get_file`` is briefly replaced by a recorder. Every
``keras.applications`` module calls it as ``file_utils.get_file(fname, origin, ...,
file_hash=...)``, looking the attribute up at call time, so replacing the module attribute is
enough. ``tests/test_weights_download.py`` checks this against every registered backbone.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import inspect
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtransfer.errors import WeightsUnavailableError
from medtransfer.models.backbones import build_backbone, get_backbone

MIRROR_ENV = "MEDTRANSFER_WEIGHTS_MIRROR"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsSource:
    """Where Keras gets one backbone's ImageNet no-top weights.

    ``file_hash`` is the hex digest Keras checks the download against: 64 characters mean SHA-256,
    32 mean MD5 (Keras's ``hash_algorithm="auto"`` rule), ``None`` that Keras checks nothing.
    """

    backbone: str  # registry name, e.g. "resnet50"
    filename: str  # the name Keras caches it under (~/.keras/models/<filename>)
    url: str
    file_hash: str | None

    @property
    def hash_algorithm(self) -> str | None:
        return _hash_algorithm(self.file_hash)


class _Recorded(BaseException):
    """Raised by the recorder so the constructor stops before downloading anything.

    A BaseException so that no ``except Exception`` on the way out can swallow it.
    """

    def __init__(self, arguments: dict[str, Any]) -> None:
        super().__init__("get_file intercepted")
        self.arguments = arguments


# Serialises weights_source calls against each other. It cannot protect another thread that
# calls get_file (e.g. a concurrent ``build_backbone(..., "imagenet")``) while the recorder is in
# place: that call would be recorded and aborted instead of downloading. Do not call
# weights_source concurrently with Keras downloads in other threads.
_INTERCEPT_LOCK = threading.Lock()


@contextlib.contextmanager
def _intercept_get_file() -> Iterator[None]:
    """Replace ``file_utils.get_file`` by a recorder that raises ``_Recorded``; always restore.

    Not thread-safe with respect to other users of ``get_file`` (see ``_INTERCEPT_LOCK``).
    """
    from keras.src.utils import file_utils

    original = file_utils.get_file
    signature = inspect.signature(original)

    def recorder(*args: Any, **kwargs: Any) -> Any:
        # Bind against the real signature so positional and keyword calls (and the deprecated
        # md5_hash / hash_algorithm arguments) are read the same way get_file reads them.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        raise _Recorded(dict(bound.arguments))

    with _INTERCEPT_LOCK:
        file_utils.get_file = recorder
        try:
            yield
        finally:
            file_utils.get_file = original


def weights_source(name: str) -> WeightsSource:
    """The URL, file name and hash Keras uses for ``name``'s ImageNet weights without the top.

    Builds the registered constructor with ``weights="imagenet", include_top=False`` at its
    smallest input size, with ``get_file`` intercepted (see the module docstring), so nothing is
    downloaded and the answer is whatever the installed Keras would do. Takes a fraction of a
    second to a few seconds (the graph is built); cached per process.
    Not thread-safe against concurrent Keras downloads. An unknown name raises
    ``WeightsUnavailableError`` (listing the registered ones), so the CLI reports it in one line.
    """
    try:
        backbone = get_backbone(name)
    except KeyError as error:
        raise WeightsUnavailableError(error.args[0]) from None
    return _weights_source(backbone.name)


@functools.cache
def _weights_source(name: str) -> WeightsSource:
    import keras

    backbone = get_backbone(name)
    constructor = getattr(keras.applications, backbone.constructor)
    size = backbone.min_size
    try:
        with _intercept_get_file(), warnings.catch_warnings():
            # MobileNetV3 warns that its weights are for 224 px; irrelevant here.
            warnings.simplefilter("ignore")
            constructor(weights="imagenet", include_top=False, input_shape=(size, size, 3))
    except _Recorded as recorded:
        arguments = recorded.arguments
    else:
        raise RuntimeError(f"keras.applications.{backbone.constructor} never called get_file")

    origin = arguments["origin"]
    filename = arguments["fname"] or os.path.basename(urllib.parse.urlsplit(origin).path)
    file_hash = arguments["file_hash"] or arguments["md5_hash"]
    algorithm = arguments["hash_algorithm"]
    if file_hash is not None and _hash_algorithm(file_hash) is None:
        raise RuntimeError(f"unrecognised hash {file_hash!r} from Keras for {backbone.constructor}")
    if file_hash is not None and algorithm != "auto" and algorithm != _hash_algorithm(file_hash):
        raise RuntimeError(f"Keras asks for {algorithm} with hash {file_hash!r}; not supported")
    return WeightsSource(backbone.name, filename, origin, file_hash.lower() if file_hash else None)


def _hash_algorithm(file_hash: str | None) -> str | None:
    if file_hash is None:
        return None
    try:
        int(file_hash, 16)
    except ValueError:
        return None
    return {64: "sha256", 32: "md5"}.get(len(file_hash))


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks (weights files run to hundreds of MB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_url(source: WeightsSource, mirror: str | None) -> str:
    if mirror is None:
        mirror = os.environ.get(MIRROR_ENV) or None
    if mirror is None:
        return source.url
    return mirror.rstrip("/") + "/" + urllib.parse.quote(source.filename)


def _matches(path: Path, source: WeightsSource) -> bool:
    algorithm = source.hash_algorithm
    return algorithm is not None and file_digest(path, algorithm) == source.file_hash


def download_weights(
    name: str, out_dir: str | Path, *, mirror: str | None = None, timeout: float = 30
) -> Path:
    """Download ``name``'s ImageNet no-top weights to ``out_dir/<Keras's file name>``; its path.

    ``mirror`` (default: the ``MEDTRANSFER_WEIGHTS_MIRROR`` environment variable) is a base URL
    that replaces everything before the file name, for sites with an internal artifact mirror.
    A file already there with Keras's hash is kept without downloading. The download goes to a
    temporary file in ``out_dir`` and is renamed into place only after its hash matches and it
    loads into the architecture, so ``out_dir`` never holds a partial or wrong file. The load
    check is there because a truncated or mismatched file would otherwise only fail at the
    air-gapped site, at training time, where nothing can be fetched again. ``timeout`` bounds
    connecting and each read (seconds). Any failure raises ``WeightsUnavailableError`` naming
    the URL.
    """
    source = weights_source(name)
    out_dir = Path(out_dir)
    target = out_dir / source.filename
    url = _source_url(source, mirror)
    if target.is_file() and _matches(target, source):
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{source.filename}.", suffix=".h5")
    except OSError as error:
        raise WeightsUnavailableError(f"cannot write to {out_dir}: {error}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = _fetch(url, f, source, timeout)
        if source.file_hash is not None and digest != source.file_hash:
            raise WeightsUnavailableError(
                f"{url} does not hold the file Keras expects for {source.backbone}: its "
                f"{source.hash_algorithm} is {digest}, expected {source.file_hash}; if this is a "
                "mirror, replace its copy with the file from the original URL; nothing was saved"
            )
        _check_loads(source, tmp, url)
        # mkstemp creates the file readable by its owner only; the file is meant to be shared.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _fetch(url: str, f: Any, source: WeightsSource, timeout: float) -> str | None:
    """Stream ``url`` into ``f``; return the hex digest in Keras's algorithm (None: no hash)."""
    digest = hashlib.new(source.hash_algorithm) if source.hash_algorithm else None
    advice = (
        f"check this machine's network or proxy, or set {MIRROR_ENV} to the base URL of an "
        f"internal mirror holding {source.filename}"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                received += len(chunk)
                if digest is not None:
                    digest.update(chunk)
        if expected is not None and expected.isdigit() and received != int(expected):
            raise WeightsUnavailableError(
                f"download of {url} stopped after {received} of {expected} bytes; try again, "
                f"or {advice}"
            )
    except urllib.error.HTTPError as error:
        raise WeightsUnavailableError(
            f"cannot download {url}: HTTP {error.code} {error.reason}; {advice}"
        ) from None
    except urllib.error.URLError as error:
        raise WeightsUnavailableError(f"cannot download {url}: {error.reason}; {advice}") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as error:
        reason = str(error) or type(error).__name__
        raise WeightsUnavailableError(f"cannot download {url}: {reason}; {advice}") from None
    except ValueError as error:  # a malformed URL, e.g. a mirror without a scheme
        raise WeightsUnavailableError(f"cannot download {url}: {error}") from None
    except OSError as error:  # writing the temporary file (disk full, ...)
        raise WeightsUnavailableError(f"cannot save {url}: {error}") from None
    return digest.hexdigest() if digest is not None else None


def _check_loads(source: WeightsSource, path: Path, url: str) -> None:
    """Load ``path`` into the architecture at its smallest input size (the weights do not depend
    on it), so a file that does not fit fails here, where it can still be fetched again."""
    size = get_backbone(source.backbone).min_size
    try:
        build_backbone(source.backbone, str(path), (size, size, 3))
    except WeightsUnavailableError as error:
        message = " ".join(str(error).replace(str(path), url).split())  # one line
        raise WeightsUnavailableError(f"{message}; nothing was saved") from None
