"""The DICOMweb server a PACS run talks to, with every request's time bounded.

One place makes the ``dicomweb-client`` client, so the listing (main process), the fetches
(decode workers) and STOW-RS share the same limits: a connect timeout, a read timeout per
request, and one retry on the answers a busy server gives (408, 429, 503, 504), 0.2 s later. A
server that does not answer costs at most the timeout, never a hung run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import requests
from dicomweb_client import DICOMwebClient

from medtransfer.errors import MedtransferError

__all__ = ["DEFAULT_TIMEOUT", "PacsError", "Server", "client_for", "http_problem"]

DEFAULT_TIMEOUT = 30.0  # seconds a request may wait for the server's next bytes
_CONNECT_TIMEOUT = 5.0  # a PACS on the hospital network answers a connect in milliseconds


class PacsError(MedtransferError, ValueError):
    """The PACS cannot be used as asked (unreachable, unknown study, bad query): exit 2."""


@dataclass(frozen=True)
class Server:
    """A DICOMweb service root (``http://pacs:8042/dicom-web``) and its read timeout."""

    url: str
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise PacsError(f"--dicomweb needs an http:// or https:// URL, got {self.url!r}")
        if self.timeout <= 0:
            raise PacsError(f"need a DICOMweb timeout > 0 seconds, got {self.timeout}")


@functools.cache
def client_for(server: Server) -> DICOMwebClient:
    """One client (one HTTP connection pool) per server and process."""
    client = DICOMwebClient(
        server.url.rstrip("/"), timeout=(min(_CONNECT_TIMEOUT, server.timeout), server.timeout)
    )
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=100)
    return client


def http_problem(exc: requests.RequestException, server: Server) -> str:
    """What went wrong, in words and without the URL (it may carry query values)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer within {server.timeout:g} s"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect (server down, wrong host or port, or refused)"
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    return type(exc).__name__
