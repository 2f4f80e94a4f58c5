"""``medtransfer.models.weights``: where Keras gets ImageNet weights, and downloading them.

No test touches the internet: downloads go to an http.server on 127.0.0.1 serving a real
MobileNetV3Small weights file (random initialisation, Keras's legacy .h5 layout, the layout of
the real ImageNet files), reached through ``mirror``.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from medtransfer.errors import WeightsUnavailableError
from medtransfer.models import weights as weights_module
from medtransfer.models.backbones import BACKBONES
from medtransfer.models.weights import (
    MIRROR_ENV,
    WeightsSource,
    download_weights,
    weights_source,
)

HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}

# What Keras 3 uses today; a Keras release that changes one of these fails here, loudly.
REPRESENTATIVE = {
    "resnet50": ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5"),
    "efficientnetb0": ("efficientnetb0_notop.h5", "md5"),
    "mobilenetv3small": ("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "md5"),
    "densenet121": ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5"),
    "convnexttiny": ("convnext_tiny_notop.h5", "sha256"),
}


def _check_source(name: str, source: WeightsSource) -> None:
    assert source.backbone == name
    assert source.url.startswith("https://")
    assert source.url.rsplit("/", 1)[1] == source.filename
    assert source.filename.endswith(".h5")
    assert "notop" in source.filename or "no_top" in source.filename
    # Every registered backbone has a hash in Keras 3.15; None would be legal but is not expected.
    assert source.file_hash is not None
    assert HEX[source.hash_algorithm].match(source.file_hash)


@pytest.mark.parametrize("name", sorted(REPRESENTATIVE))
def test_weights_source_representatives(name):
    from keras.src.utils import file_utils

    original = file_utils.get_file
    source = weights_source(name)
    _check_source(name, source)
    filename, algorithm = REPRESENTATIVE[name]
    assert source.filename == filename
    assert source.hash_algorithm == algorithm
    assert file_utils.get_file is original


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BACKBONES))
def test_weights_source_every_backbone(name):
    """About a minute for all 24 (each builds its graph once)."""
    _check_source(name, weights_source(name))


def test_weights_source_accepts_constructor_spelling_and_rejects_unknown():
    assert weights_source("MobileNetV3Small") == weights_source("mobilenetv3small")
    with pytest.raises(WeightsUnavailableError, match="unknown backbone 'nope'"):
        weights_source("nope")


def test_interception_is_restored_and_keras_get_file_untouched(monkeypatch):
    import keras
    from keras.src.utils import file_utils

    original = file_utils.get_file
    assert original is keras.utils.get_file  # the exported name is the same function

    weights_source("mobilenetv3small")
    assert file_utils.get_file is original

    def broken(**kwargs):
        raise ZeroDivisionError("constructor failed")

    # weights_source caches per name; clear so the patched constructors are really called.
    weights_module._weights_source.cache_clear()
    monkeypatch.setattr(keras.applications, "MobileNetV3Small", broken)
    with pytest.raises(ZeroDivisionError):
        weights_source("mobilenetv3small")
    assert file_utils.get_file is original

    monkeypatch.setattr(keras.applications, "MobileNetV3Small", lambda **kwargs: None)
    with pytest.raises(RuntimeError, match="never called get_file"):
        weights_source("mobilenetv3small")
    assert file_utils.get_file is original
    monkeypatch.undo()
    weights_module._weights_source.cache_clear()
    assert weights_source("mobilenetv3small").filename == REPRESENTATIVE["mobilenetv3small"][0]
    assert file_utils.get_file is original


# --- downloads from a local server -----------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy_no_mirror(monkeypatch):
    """Keep 127.0.0.1 direct even if the environment names a proxy, and ignore a real mirror."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(MIRROR_ENV, raising=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A folder holding a real MobileNetV3Small weights file under the name Keras expects.

    ``save_weights`` only writes the Keras 3 ``.weights.h5`` layout; the ImageNet files (and a
    ``*.h5`` path given to ``load_weights``) use the legacy layout, so it is written with that.
    """
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from medtransfer.models.backbones import build_backbone

    folder = tmp_path_factory.mktemp("served")
    model = build_backbone("mobilenetv3small", "none", (32, 32, 3))
    filename = weights_source("mobilenetv3small").filename
    with h5py.File(folder / filename, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    data = (folder / filename).read_bytes()
    (folder / "mirror" / "prefix").mkdir(parents=True)
    (folder / "mirror" / "prefix" / filename).write_bytes(data)
    (folder / "truncated.h5").write_bytes(data[: len(data) // 2])
    return folder


class _Server:
    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                if self.path.startswith("/short/"):
                    # Promises more bytes than it sends, then hangs up.
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\0" * 1000)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(served) -> Iterator[_Server]:
    running = _Server(served)
    yield running
    running.close()


def _with_hash(monkeypatch, path: Path, algorithm: str = "md5") -> WeightsSource:
    """Make download_weights expect ``path``'s true hash instead of Keras's ImageNet one."""
    real = weights_source("mobilenetv3small")
    digest = hashlib.new(algorithm, path.read_bytes()).hexdigest()
    fake = replace(real, file_hash=digest)
    monkeypatch.setattr(weights_module, "weights_source", lambda name: fake)
    return fake


def test_hash_mismatch_fails_and_leaves_nothing(server, tmp_path):
    out = tmp_path / "out"
    filename = weights_source("mobilenetv3small").filename
    with pytest.raises(WeightsUnavailableError) as error:
        download_weights("mobilenetv3small", out, mirror=server.url)
    message = str(error.value)
    assert server.url + filename in message
    assert "expected " + weights_source("mobilenetv3small").file_hash in message
    assert "\n" not in message
    assert list(out.iterdir()) == []
    assert len(server.requests) == 1


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_download_success_then_no_second_request(server, served, tmp_path, monkeypatch, algorithm):
    source = _with_hash(
        monkeypatch, served / weights_source("mobilenetv3small").filename, algorithm
    )
    out = tmp_path / "new" / "folder"  # created on demand
    path = download_weights("mobilenetv3small", out, mirror=server.url.rstrip("/"))
    assert path == out / source.filename
    assert path.read_bytes() == (served / source.filename).read_bytes()
    assert server.requests == ["/" + source.filename]
    assert sorted(p.name for p in out.iterdir()) == [source.filename]  # no temporary left
    assert path.stat().st_mode & 0o777 == 0o644

    assert download_weights("mobilenetv3small", out, mirror=server.url) == path
    assert len(server.requests) == 1


def test_mirror_from_environment_and_stale_file_replaced(server, served, tmp_path, monkeypatch):
    source = _with_hash(monkeypatch, served / weights_source("mobilenetv3small").filename)
    (tmp_path / source.filename).write_bytes(b"an old, wrong file")
    monkeypatch.setenv(MIRROR_ENV, server.url + "mirror/prefix")
    path = download_weights("mobilenetv3small", tmp_path)
    assert server.requests == ["/mirror/prefix/" + source.filename]
    assert path.read_bytes() == (served / source.filename).read_bytes()


def test_file_that_does_not_load_is_not_saved(server, served, tmp_path, monkeypatch):
    """A truncated file with a matching hash (e.g. a bad mirror copy) fails the load check."""
    source = _with_hash(monkeypatch, served / "truncated.h5")
    monkeypatch.setattr(
        weights_module, "weights_source", lambda name: replace(source, filename="truncated.h5")
    )
    with pytest.raises(WeightsUnavailableError, match="does not fit MobileNetV3Small") as error:
        download_weights("mobilenetv3small", tmp_path, mirror=server.url)
    assert server.url + "truncated.h5" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_http_404_and_short_transfer_leave_nothing(server, tmp_path):
    with pytest.raises(WeightsUnavailableError, match="HTTP 404") as error:
        download_weights("mobilenetv3small", tmp_path, mirror=server.url + "missing/")
    assert server.url + "missing/" in str(error.value)
    with pytest.raises(WeightsUnavailableError) as error:
        download_weights("mobilenetv3small", tmp_path, mirror=server.url + "short/")
    assert server.url + "short/" in str(error.value)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_fails_fast(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/"
    weights_source("mobilenetv3small")  # build the graph outside the timed part
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as error:
        download_weights("mobilenetv3small", tmp_path, mirror=mirror, timeout=5)
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert mirror + weights_source("mobilenetv3small").filename in message
    assert MIRROR_ENV in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_no_interception_left_behind():
    import keras
    from keras.src.utils import file_utils

    assert file_utils.get_file is keras.utils.get_file
    assert file_utils.get_file.__module__ == "keras.src.utils.file_utils"
    assert file_utils.get_file.__name__ == "get_file"
