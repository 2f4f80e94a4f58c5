"""Batch scoring of folders: every file under a folder becomes exactly one row of ``scores.csv``.

Decoding (GIL-bound, up to ~1 s for a large JPEG 2000 radiograph) runs in the shared folder engine
(``medtransfer.folder_pool``): a ``spawn`` pool that imports only ``medtransfer.io``, so TensorFlow
is never forked or loaded twice. This module adds what is particular to scoring: the main process
predicts in batches while the workers decode the window ahead, and the rows carry probabilities.
Each file is resized to the model's size where it is decoded (``medtransfer.io.resize``, the
model's own resize in NumPy), so a worker sends 200 KB instead of a full radiograph and the main
process, busy with the model, does not resize. Uncompressed DICOM is decoded in the main process
instead while that costs under a quarter of the model's time per file (``LocalFirst``): a worker
costs more CPU per file than the decoding itself (benchmarks/RESULTS.md, "Scoring"), and no
compiled codec runs outside the pool.

Rows are appended in crawl order to ``<out>.partial`` as each batch finishes, so a killed run loses
at most one batch; ``resume=True`` keeps the longest valid prefix of that file and scores the rest.
The final file replaces the output atomically, so readers never see half a table.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from medtransfer.data.profile import image_statistics, normalized_header
from medtransfer.data.tabular import tolerant_values
from medtransfer.folder_output import CsvOutput, ParquetOutput
from medtransfer.folder_pool import (
    DEFAULT_LIMITS,
    WORKER_DIED,
    DecodeLimits,
    FolderError,
    FolderPool,
    LocalFirst,
    Outcome,
    check_paths,
    crawl,
    describe,
)
from medtransfer.io import ImageReadError, is_uncompressed_dicom, load_image
from medtransfer.io.resize import model_pixels
from medtransfer.scope import percentiles, scope_verdict

if TYPE_CHECKING:
    from medtransfer.spec import TabularFeature

__all__ = [
    "BASE_COLUMNS",
    "INTENSITY_COLUMNS",
    "SCOPE_COLUMNS",
    "WORKER_DIED",
    "Decoded",
    "Decoding",
    "FileSource",
    "Predictor",
    "ScopeRule",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringError",
    "crawl",
    "decode_file",
    "decoding",
    "output_table",
    "predict_rows",
    "prob_columns",
    "score_files",
    "score_folder",
    "summarise",
    "tally",
]  # beyond the two entry points: the pieces the Ray and PACS engines build on

BASE_COLUMNS = ("path", "status", "error", "sop_instance_uid")
# What the file's header says it is, whether the model was trained on such images (scope.py),
# and how far its features lie from the training images' (models/ood.py).
SCOPE_COLUMNS = ("modality", "body_part", "in_scope", "ood_score", "ood_percentile")
# The mean and SD of the model's input pixels: what `medtransfer monitor` tests for drift
INTENSITY_COLUMNS = ("intensity_mean", "intensity_std")
DEFAULT_OOD_PERCENTILE = 99.0  # flag scores above this percentile of the validation images
_LEADING = len(BASE_COLUMNS) + len(SCOPE_COLUMNS) + len(INTENSITY_COLUMNS)  # then probabilities
_IN_SCOPE = len(BASE_COLUMNS) + SCOPE_COLUMNS.index("in_scope")


class ScoringError(FolderError):
    """Arguments that make scoring impossible or unsafe; the CLI reports them in one line."""


class Predictor(Protocol):
    """What scoring needs from a model; ``medtransfer.predictor`` provides one for a run or an
    export. ``tabular`` lists the model's tabular features: scoring reads each one's DICOM tag
    (a feature without a tag, or a file without the tag, is passed as missing)."""

    class_names: list[str]
    window: str | dict
    frames: str
    tabular: Sequence[TabularFeature]
    image_size: tuple[int, int]
    channels: int
    profile: Mapping[str, Any] | None  # the training profile, for scope checks
    ood_validation: np.ndarray | None  # validation images' sorted OOD scores (None: no OOD)

    def predict_with_ood(
        self, images: list[np.ndarray], tabular: Mapping[str, Sequence[float | str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict`` and each image's OOD score (None when the model computes none)."""
        ...

    def predict(
        self, images: list[np.ndarray], tabular: Mapping[str, Sequence[float | str]] | None = None
    ) -> np.ndarray:
        """Variable-size [H,W] or [H,W,3] float32 images in [0, 1] -> [len, K] probabilities."""
        ...


@dataclass
class ScoreSummary:
    """Counts describe the whole output file, so ``exit_code`` reflects what the CSV holds."""

    out_csv: str
    n_files: int
    n_ok: int
    n_error: int
    n_resumed: int
    seconds: float
    files_per_second: float
    n_out_of_scope: int = 0  # in_scope "no: ...": not the kind of image the model was trained on

    @property
    def exit_code(self) -> int:
        """CLI contract: 0 when every file scored, 1 when some files are error rows."""
        return 1 if self.n_error else 0

    def __str__(self) -> str:
        resumed = f" ({self.n_resumed} kept from a previous run)" if self.n_resumed else ""
        return (
            f"{self.n_files} files{resumed}: {self.n_ok} ok, {self.n_error} errors. "
            f"Scored {self.n_files - self.n_resumed} in {self.seconds:.1f} s "
            f"({self.files_per_second:.1f} files/s). Wrote {self.out_csv}."
            + (
                f" {self.n_out_of_scope} files are out of the model's scope (see in_scope)."
                if self.n_out_of_scope
                else ""
            )
        )


class Decoded(NamedTuple):
    """Worker result: plain values only, so it always pickles back to the main process."""

    pixels: np.ndarray  # at the model's size and channels
    sop_instance_uid: str
    tags: tuple[str, ...]  # raw values of the requested DICOM tags ("" when absent)
    header: dict[str, str] | None  # what the image is (normalized_header); None: not DICOM
    intensity: tuple[float, float]  # mean and SD of ``pixels`` (image_statistics)


class Decoding(NamedTuple):
    """What a decode worker needs to know besides the file."""

    window: str | dict
    frames: str
    size: tuple[int, int]
    channels: int
    tags: tuple[str, ...]
    max_pixels: int | None


def decoding(predictor: Predictor, limits: DecodeLimits) -> Decoding:
    """How files are decoded for ``predictor``: its window, frames, size, channels, the tags its
    tabular features read, and the pixel budget."""
    return Decoding(
        predictor.window,
        predictor.frames,
        tuple(predictor.image_size),
        predictor.channels,
        _tags(predictor.tabular),
        limits.max_pixels,
    )


def decode_file(path: str, how: Decoding) -> Decoded:
    """Runs in a decode worker; an ImageReadError becomes the file's error row. The image is
    resized here, to the model's size: what crosses the pipe is 200 KB at 224 px rather than
    the full image, and the main process, which runs the model, does not resize."""
    image = load_image(path, window=how.window, frames=how.frames, max_pixels=how.max_pixels)
    values = _tag_values(path, how.tags) if how.tags else ()
    pixels = model_pixels(image.pixels, how.size, how.channels)
    header = normalized_header(image.meta) if image.meta else None
    mean, std = image_statistics(pixels[np.newaxis])
    return Decoded(pixels, image.sop_instance_uid, values, header, (float(mean[0]), float(std[0])))


def _tag_values(path: str, tags: tuple[str, ...]) -> tuple[str, ...]:
    """A second, header-only read: cheap next to decoding, and only for tabular models."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
    except (InvalidDicomError, OSError, ValueError, EOFError):  # PNG and other non-DICOM inputs
        return ("",) * len(tags)
    return tuple(str(ds.get(tag, "") or "") for tag in tags)


def score_folder(
    input_dir: str | os.PathLike,
    predictor: Predictor,
    out_csv: str | os.PathLike,
    *,
    workers: int = 2,
    batch_size: int = 16,
    resume: bool = False,
    progress: bool = True,
    decode_here: bool = True,
    limits: DecodeLimits = DEFAULT_LIMITS,
    strict: bool = False,
    ood_percentile: float = DEFAULT_OOD_PERCENTILE,
) -> ScoreSummary:
    """Score every file under ``input_dir`` into ``out_csv`` (see the ``scores.csv`` contract).

    An ``out_csv`` ending in ``.parquet`` gets the same rows as a Parquet table (probabilities
    as float32, empty for error rows as nulls); rows are still appended to a CSV partial file
    while scoring runs, so resuming works the same.

    Unreadable files become error rows rather than exceptions: one bad file in an archive must not
    stop the other thousands. ``workers=0`` decodes in this process, for debugging;
    ``decode_here=False`` sends every file to the workers, uncompressed DICOM too. ``limits``
    bounds what one file may cost (decode time, worker memory, pixels): a file past a limit is
    an error row saying which. Raises OutputBusyError while another run writes ``out_csv``.

    Every row says what the file's header calls the image (``modality``, ``body_part``) and
    whether the model was trained on such images (``in_scope``: ``yes``, ``no: <reasons>`` or
    ``unknown: <why>``, from the model's training profile; ``medtransfer.scope``), and, for a
    model with an OOD reference, ``ood_score`` (``medtransfer.models.ood``: how far its features
    lie from the training images', stage by stage) with its percentile among the validation
    images' scores: at or above ``ood_percentile`` the file is out of scope too. Out-of-scope
    files keep their probabilities; with ``strict`` they are error rows instead.
    Raises ScoringError or FolderError (both ValueErrors) for bad arguments, e.g. an ``out_csv``
    inside ``input_dir``: it would be crawled as an input, and nothing may be written there.
    """
    options = ScoreOptions(workers, batch_size, resume, progress, limits, strict, ood_percentile)
    root, out = check_paths(input_dir, out_csv)
    source = FileSource(root, crawl(root), local=decode_here)
    return score_files(source, predictor, out, options)


@dataclass(frozen=True)
class ScoreOptions:
    """How a scoring run goes, whatever its files are (see ``score_folder``)."""

    workers: int = 2
    batch_size: int = 16
    resume: bool = False
    progress: bool = True
    limits: DecodeLimits = DEFAULT_LIMITS
    strict: bool = False
    ood_percentile: float = DEFAULT_OOD_PERCENTILE

    def __post_init__(self) -> None:
        if self.workers < 0 or self.batch_size < 1:
            raise ScoringError(
                f"need workers >= 0 and batch_size >= 1, got {self.workers} and {self.batch_size}"
            )


@dataclass(frozen=True)
class FileSource:
    """Where a scoring run's files come from and how each becomes a model input.

    ``names``: the files under ``root``, in output order (a folder's crawl, or the instances a
    PACS listed, staged under ``root`` as they are fetched). ``decode(path, how, *extra)`` runs
    in a decode worker and returns a ``Decoded``; the ``expected`` exceptions it raises are the
    file's error row as they are. ``local``: uncompressed DICOM may be decoded in this process
    (``LocalFirst``). ``on_rows`` sees each batch's rows before they are written, and returns
    the rows to write: what must exist before a row counts as done (a structured report) is
    made there, so a resumed run never skips a file whose extra output is missing.
    """

    root: str
    names: Iterable[str]
    local: bool = True
    decode: Callable[..., Decoded] = decode_file
    extra: tuple = ()
    expected: tuple[type[Exception], ...] = (ImageReadError,)
    on_rows: Callable[[list[list[str]]], list[list[str]]] | None = None


def score_files(
    source: FileSource, predictor: Predictor, out: Path, options: ScoreOptions = ScoreOptions()
) -> ScoreSummary:
    """Score ``source``'s files into ``out``: the engine behind ``score_folder`` and the PACS
    input (``medtransfer.pacs``), so both get the same decoding, limits, scope checks, error
    rows, lock, resume and atomic output. ``out`` must already be checked (``check_paths``)."""
    start = time.monotonic()
    workers, batch_size = options.workers, options.batch_size
    output = output_table(out, predictor.class_names, options.resume)
    local = LocalFirst(is_uncompressed_dicom) if source.local and workers else None
    how = decoding(predictor, options.limits)
    pool = FolderPool(
        source.root,
        source.decode,
        (how, *source.extra),
        workers=workers,
        expected=source.expected,
        local=local,
        limits=options.limits,
    )
    scope = ScopeRule(options.strict, options.ood_percentile)
    counts: Counter[str] = Counter()
    hidden = not options.progress
    with (
        output,
        pool,
        tqdm(desc="scoring", unit=" files", disable=hidden, dynamic_ncols=True) as bar,
    ):
        # One batch being assembled and one decoding ahead of it, plus a file per worker: enough
        # to keep workers busy while the model runs, few enough to bound memory (decoded images).
        max_in_flight = 2 * (batch_size + max(workers, 1))
        decoded = pool.imap(output.pending(source.names), max_in_flight)
        for batch_rows in _score_batches(decoded, predictor, batch_size, local, scope):
            rows = source.on_rows(batch_rows) if source.on_rows else batch_rows
            output.write(rows)
            counts.update(key for row in rows for key in tally(row))
            bar.update(len(rows))
            bar.set_postfix(errors=counts["error"], refresh=False)
    return summarise(str(out), counts, output.kept_rows, time.monotonic() - start)


def output_table(out: Path, class_names: Iterable[str], resume: bool) -> CsvOutput:
    """The scores table; a ``.parquet`` name gets Parquet with float32 probabilities."""
    columns = [*BASE_COLUMNS, *SCOPE_COLUMNS, *INTENSITY_COLUMNS, *prob_columns(class_names)]
    options = {"resume": resume, "row_is_valid": _row_is_valid}
    if out.suffix.lower() == ".parquet":
        floats = ["ood_score", "ood_percentile", *INTENSITY_COLUMNS, *columns[_LEADING:]]
        return ParquetOutput(out, columns, float_columns=floats, **options)
    return CsvOutput(out, columns, **options)


def summarise(
    out_csv: str, counts: Counter[str], kept_rows: Sequence[Sequence[str]], seconds: float
) -> ScoreSummary:
    """Counts over the whole file, rows kept from a previous run included; the rate over the
    files this run scored."""
    totals = Counter(counts)
    totals.update(key for row in kept_rows for key in tally(row))
    scored = counts["ok"] + counts["error"]
    return ScoreSummary(
        out_csv=out_csv,
        n_files=totals["ok"] + totals["error"],
        n_ok=totals["ok"],
        n_error=totals["error"],
        n_resumed=len(kept_rows),
        seconds=seconds,
        files_per_second=scored / seconds if seconds else 0.0,
        n_out_of_scope=totals["out of scope"],
    )


def tally(row: Sequence[str]) -> tuple[str, ...]:
    """What a row counts towards: its status, and being out of the model's scope."""
    out_of_scope = row[_IN_SCOPE].startswith("no:")
    return (row[1], "out of scope") if out_of_scope else (row[1],)


def prob_columns(class_names: Iterable[str]) -> list[str]:
    names = list(class_names)
    if not names or len(set(names)) != len(names):
        raise ScoringError(f"predictor class_names must be non-empty and unique, got {names}")
    return [f"prob_{name}" for name in names]


# --- predicting -----------------------------------------------------------------------------------


def _score_batches(
    decoded: Iterator[Outcome[Decoded]],
    predictor: Predictor,
    batch_size: int,
    local: LocalFirst | None,
    scope: ScopeRule,
) -> Iterator[list[list[str]]]:
    """Yield rows batch by batch in crawl order; the pool keeps decoding ahead meanwhile.

    Each batch after the first (which may trace the model's graph) tells ``local`` the model's
    time per file: the budget that decoding in this process must stay well inside."""
    first = True
    while batch := list(islice(decoded, batch_size)):
        start = time.perf_counter()
        rows = predict_rows(batch, predictor, scope)
        if local is not None and not first:
            local.per_file_budget = (time.perf_counter() - start) / len(batch)
        first = False
        yield rows


def _tags(features: Sequence[TabularFeature]) -> tuple[str, ...]:
    """The DICOM tags to read for the model's tabular features, in feature order."""
    return tuple(f.source_tag for f in features if f.source_tag)


class ScopeRule(NamedTuple):
    """How out-of-scope files are treated: ``strict`` leaves them unpredicted; an OOD score at
    or above the ``ood_percentile`` of the validation images' flags a file."""

    strict: bool
    ood_percentile: float


class _Prediction(NamedTuple):
    probs: np.ndarray
    ood: float | None


def predict_rows(
    batch: list[Outcome[Decoded]], predictor: Predictor, scope: ScopeRule
) -> list[list[str]]:
    """One row per file. Out-of-scope files are predicted and flagged, or with ``strict``
    error rows saying why (those the header rules out are not even predicted)."""
    verdicts = [
        scope_verdict(d.value.header, predictor.profile) if d.value is not None else ""
        for d in batch
    ]
    refused = [scope.strict and verdict.startswith("no:") for verdict in verdicts]
    images = [d.value for d, no in zip(batch, refused, strict=True) if d.value and not no]
    predictions = iter(_predict(predictor, images) if images else [])
    return [
        _row(decoded, verdict, decoded.error or ("" if no else next(predictions)), predictor, scope)
        for decoded, verdict, no in zip(batch, verdicts, refused, strict=True)
    ]


def _row(
    decoded: Outcome[Decoded],
    verdict: str,
    outcome: _Prediction | str,
    predictor: Predictor,
    scope: ScopeRule,
) -> list[str]:
    """``outcome``: the prediction, an error message, or "" for a file refused unpredicted."""
    value = decoded.value
    identity = (decoded.path, value.sop_instance_uid if value else "")
    ood = ["", ""]
    if isinstance(outcome, _Prediction) and outcome.ood is not None:
        reference = predictor.ood_validation
        percentile = float(percentiles(np.array([outcome.ood]), reference)[0])
        ood = [_format_prob(np.float32(outcome.ood)), f"{percentile:.1f}"]
        if percentile >= scope.ood_percentile:
            reason = (
                f"features unlike the training images (OOD percentile {percentile:.1f}, "
                f"flagged from {scope.ood_percentile:g})"
            )
            verdict = f"{verdict}; {reason}" if verdict.startswith("no:") else f"no: {reason}"
    if not decoded.error and scope.strict and verdict.startswith("no:"):
        outcome = f"out of scope: {verdict.removeprefix('no: ')}"
    scope_cells = [*_kind(value.header if value else None), verdict, *ood, *_intensity(value)]
    if isinstance(outcome, str):
        no_probs = [""] * len(predictor.class_names)
        return [identity[0], "error", outcome, identity[1], *scope_cells, *no_probs]
    probs = map(_format_prob, outcome.probs)
    return [identity[0], "ok", "", identity[1], *scope_cells, *probs]


def _intensity(value: Decoded | None) -> tuple[str, str]:
    """The intensity columns, 6 decimals: enough for drift tests on [0, 1] pixels."""
    return tuple(f"{v:.6f}" for v in value.intensity) if value else ("", "")


def _kind(header: dict[str, str] | None) -> tuple[str, str]:
    """The modality and body part columns: what the header says the image is."""
    return (header["Modality"], header["BodyPartExamined"]) if header else ("", "")


def _predict(predictor: Predictor, images: list[Decoded]) -> list[_Prediction | str]:
    """A prediction or an error message per image. A batch that fails is retried image by image,
    so one image the model cannot take only costs its own row."""
    try:
        probs, ood = _predict_array(predictor, images)
    except Exception as exc:
        if len(images) == 1:
            return [f"prediction failed: {describe(exc)}"]
        return [outcome for image in images for outcome in _predict(predictor, [image])]
    scores = [None] * len(probs) if ood is None else [float(v) for v in ood]
    return [_check(_Prediction(p, score)) for p, score in zip(probs, scores, strict=True)]


def _predict_array(
    predictor: Predictor, images: list[Decoded]
) -> tuple[np.ndarray, np.ndarray | None]:
    pixels = [image.pixels for image in images]
    if predictor.tabular:
        tagged = [f for f in predictor.tabular if f.source_tag]
        tabular = {
            feature.name: tolerant_values([image.tags[i] for image in images], feature)
            for i, feature in enumerate(tagged)
        }
        probs, ood = predictor.predict_with_ood(pixels, tabular)  # untagged features: missing
    else:
        probs, ood = predictor.predict_with_ood(pixels)
    probs = np.asarray(probs, dtype=np.float32)
    expected = (len(images), len(predictor.class_names))
    if probs.shape != expected:
        raise ValueError(f"predictor returned shape {probs.shape}, expected {expected}")
    return probs, ood


def _check(prediction: _Prediction) -> _Prediction | str:
    probs = prediction.probs
    if np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1)):
        return prediction
    return "model returned probabilities that are not finite numbers in [0, 1]"


def _format_prob(value: np.float32) -> str:
    """Shortest text that reads back as the same float32."""
    return np.format_float_positional(value, unique=True, trim="-")


def _row_is_valid(row: list[str]) -> bool:
    status, error, probs = row[1], row[2], row[_LEADING:]
    if status == "error":
        return bool(error) and not any(probs)
    if status != "ok" or error:
        return False
    try:
        return all(0 <= float(p) <= 1 for p in probs)
    except ValueError:
        return False
