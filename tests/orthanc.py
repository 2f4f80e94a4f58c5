"""A throwaway Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the PACS tests.

Started on a free loopback port with its own storage folder and the DICOMweb plugin, checked
ready within a bounded time, stopped by the fixture that started it. ``.ci/run`` installs the
packages; where they are missing the tests skip, saying so.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = Path("/usr/sbin/Orthanc")
READY_SECONDS = 30.0


def dicomweb_plugin() -> Path | None:
    """The plugin's shared library, as the ``orthanc-dicomweb`` package installed it."""
    if shutil.which("dpkg") is None:
        return None
    listing = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    ).stdout.split()
    found = [Path(p) for p in listing if Path(p).name == "libOrthancDicomWeb.so"]
    return next((p for p in found if p.exists()), None)


def missing() -> str:
    """Why Orthanc cannot run here ("" when it can)."""
    if not ORTHANC.exists():
        return f"{ORTHANC} not found: apt-get install orthanc orthanc-dicomweb (.ci/run does)"
    if dicomweb_plugin() is None:
        return "the orthanc-dicomweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return ""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Orthanc:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def upload(self, path: Path) -> None:
        answer = requests.post(f"{self.rest}/instances", data=path.read_bytes(), timeout=30)
        answer.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


def start_orthanc(folder: Path) -> Orthanc:
    """Orthanc serving HTTP (REST + DICOMweb) on a free port, no DICOM port, no auth."""
    port = free_port()
    storage = folder / "storage"
    config = {
        "Name": "medtransfer-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = folder / "orthanc.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [str(ORTHANC), str(folder / "config.json")], stdout=sink, stderr=subprocess.STDOUT
        )
    server = Orthanc(process, port, log)
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{server.dicomweb}/studies", timeout=1).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"Orthanc not ready after {READY_SECONDS:g} s: {log.read_text()[-2000:]}")
