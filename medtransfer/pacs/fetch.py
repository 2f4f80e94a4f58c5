"""WADO-RS retrieval inside a decode worker: fetch one instance, stage it, decode it.

A PACS run stages each listed instance as an empty ticket file ``STUDY/SERIES/SOP`` under its
staging folder; the folder engine hands tickets to ``fetch_and_decode`` in its spawned workers
like files of a folder. Fetching there, not in the main process, gives a fetch what a decode
has: the per-file time limit and memory cap (a hostile or endless answer costs one row, not
the run), a crash contained to a worker, and the main process left to the model. A failed
fetch raises ``FetchError``, which the engine writes as that instance's error row.

The instance is requested in the transfer syntax the PACS stored (``transfer-syntax=*``), so
the pixels decoded are those folder scoring of the same file decodes, and written where the
ticket was (the report writer reads its header afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path

import requests

from medtransfer.folder_pool import describe
from medtransfer.pacs.client import Server, client_for, http_problem
from medtransfer.scoring import Decoded, Decoding, decode_file

__all__ = ["FetchError", "fetch_and_decode", "stage_instance"]


class FetchError(Exception):
    """An instance the PACS did not deliver: its row's error message, as it is."""


def fetch_and_decode(path: str, how: Decoding, server: Server) -> Decoded:
    """Runs in a decode worker: ``path`` is a ticket ``.../STUDY/SERIES/SOP``."""
    stage_instance(path, server)
    return decode_file(path, how)


def stage_instance(path: str, server: Server) -> None:
    """Fetch the instance a ticket names and write it in the ticket's place (atomically: a
    worker ended by the time limit leaves the ticket, never half a file)."""
    study, series, sop = Path(path).parts[-3:]
    try:
        dataset = client_for(server).retrieve_instance(study, series, sop)
    except requests.RequestException as exc:
        raise FetchError(f"fetch failed: {http_problem(exc, server)}") from None
    except Exception as exc:  # the answer did not parse as a DICOM instance
        raise FetchError(
            f"fetch failed: the answer is not a DICOM instance ({describe(exc)})"
        ) from None
    if str(dataset.get("SOPInstanceUID", "")) != sop:
        raise FetchError("fetch failed: the server sent another instance than the one asked for")
    part = f"{path}.part"
    try:
        dataset.save_as(part, enforce_file_format=True)
        os.replace(part, path)
    except (ValueError, AttributeError, TypeError) as exc:
        raise FetchError(
            f"fetch failed: the instance cannot be written ({describe(exc)})"
        ) from None
    finally:
        Path(part).unlink(missing_ok=True)
