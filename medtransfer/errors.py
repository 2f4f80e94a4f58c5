"""Errors a user can act on. The CLI prints them in one line (exit code 2), without a traceback."""


class MedtransferError(Exception):
    """Base of every user-facing error."""


class SpecError(MedtransferError, ValueError):
    """A spec that cannot be used; the message names the file, the field and the problem."""


class DataError(MedtransferError):
    """Images a run needs could not be read."""


class WeightsUnavailableError(MedtransferError):
    """Pretrained weights could not be obtained (offline, or a file that does not fit)."""


class RunError(MedtransferError):
    """A run directory that is missing, incomplete or would be overwritten."""


class ExportError(MedtransferError):
    """An export target that cannot be written, or a model source that cannot be exported."""


class DegenerateModelWarning(UserWarning):
    """A model whose predictions hardly vary across images: it cannot tell them apart, however
    finished its run looks (AUROC 0.5, no finite threshold). Its own category so that the CLI
    can show it in one line and a notebook or test can catch or escalate exactly this."""
