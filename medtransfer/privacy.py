"""Pseudonymous keys for identifiers that must group data but never be stored."""

from __future__ import annotations

import hashlib


def pseudonym(identifier: object, salt: str) -> str:
    """Salted SHA-256 (first 16 hex characters) of an identifier such as a PatientID.

    Stable for the same salt, so a patient's images group together across runs; the identifier
    itself is never written anywhere.
    """
    if not salt:
        raise ValueError("a pseudonym needs a non-empty salt")
    return hashlib.sha256(f"{salt}\x00{identifier}".encode()).hexdigest()[:16]
