"""Archive scoring on Ray Data: ``medtransfer score INPUT --engine ray``.

The same rows as ``medtransfer.scoring`` (same decode function, limits, scope checks and row
builder), computed by a Ray cluster instead of one process pool, for archives one machine would
take days over. The pipeline:

1. The driver crawls the folder (``folder_pool.crawl``: hostile entries included) and writes the
   listing as JSON-lines shards into a staging folder beside the output. A file-based read is
   what Ray Data's checkpointing filters: rows whose ``path`` an earlier, killed run already
   wrote are skipped (``CheckpointConfig(id_column="path")``).
2. Decode actors, each holding a one-worker ``FolderPool`` (so the per-file time limit, memory
   cap and pixel budget are the local path's, and a decoder that hangs or crashes costs one
   error row, not a Ray task), turn paths into model-size images.
3. Model actors load the predictor once each and build the rows (``scoring.predict_rows``).
4. Rows are written as Parquet parts into the staging folder; once every file is there, they are
   put in crawl order and published to ``--out`` atomically (CSV or Parquet, as locally), and
   the staging folder is removed.

Actor pools are sized below the cluster's CPU count: the read tasks need a CPU too, and a pool
as large as the cores starved the reader in a trial. The staging folder (listing, parts and
checkpoint) must be on storage every node sees when the cluster has more than one machine.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medtransfer.folder_output import CSV_FILE, display_path, valid_utf8
from medtransfer.folder_pool import (
    DEFAULT_LIMITS,
    DecodeLimits,
    FolderPool,
    Outcome,
    check_paths,
    crawl,
)
from medtransfer.io import ImageReadError
from medtransfer.scoring import (
    BASE_COLUMNS,
    DEFAULT_OOD_PERCENTILE,
    INTENSITY_COLUMNS,
    SCOPE_COLUMNS,
    Decoded,
    Decoding,
    ScopeRule,
    ScoreSummary,
    ScoringError,
    decode_file,
    decoding,
    output_table,
    predict_rows,
    prob_columns,
    summarise,
    tally,
)

LISTING_SHARD = 64  # paths per listing file: the unit a killed run resumes from
LISTING_COLUMNS = ("path", "raw")
STAGING_SUFFIX = ".ray-staging"
ACTOR_CPUS = 0.75  # what a decode or model actor claims (its work runs in its own process/threads)
TASK_CPUS = 0.25  # what a listing read or a part write claims


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` None starts Ray on this machine (``ray.init()``), "auto"
    joins the cluster this machine is part of, ``ray://HOST:PORT`` a remote one. ``decoders``
    and ``models``: actor pool sizes (None: below the cluster's CPU count)."""

    address: str | None = None
    decoders: int | None = None
    models: int | None = None


def score_folder_ray(
    input_dir: str | os.PathLike,
    model: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    ray_options: RayOptions = RayOptions(),
    batch_size: int = 16,
    resume: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
    strict: bool = False,
    ood_percentile: float = DEFAULT_OOD_PERCENTILE,
) -> ScoreSummary:
    """Score every file under ``input_dir`` with ``model`` on Ray into ``out_csv``: the rows
    ``scoring.score_folder`` writes, in the same (crawl) order. ``resume`` continues a killed
    run from its staging folder; without it an old staging folder is discarded."""
    from medtransfer.predictor import load_predictor

    try:
        import ray.data  # noqa: F401  (checked before any work is done)
    except ImportError:
        raise ScoringError("--engine ray needs Ray: pip install 'medtransfer[ray]'") from None
    start = time.monotonic()
    root, out = check_paths(input_dir, out_csv)
    predictor = load_predictor(model)
    how = decoding(predictor, limits)
    staging = out.with_name(out.name + STAGING_SUFFIX)
    output = output_table(out, predictor.class_names, resume=False)  # holds the output's lock
    with output:
        if staging.exists() and not resume:
            shutil.rmtree(staging)
        listed = _listing(root, staging / "listing")
        columns = _columns(predictor.class_names)
        before = _parts(staging / "parts", columns)
        job = _Job(root, how, limits, str(model), batch_size, ScopeRule(strict, ood_percentile))
        _run(job, staging, ray_options)
        rows = _parts(staging / "parts", columns)
        missing = [display for display, _ in listed if display not in rows]
        if missing:
            raise ScoringError(
                f"Ray wrote no row for {len(missing)} of {len(listed)} files (first: "
                f"{missing[0]}); rerun with --resume to score them"
            )
        # the rows in crawl order, each with its file's own path (the writer makes it a cell)
        ordered = [[raw, *rows[display][1:]] for display, raw in listed]
        output.write(ordered)
    shutil.rmtree(staging, ignore_errors=True)
    kept = [row for row, (display, _) in zip(ordered, listed, strict=True) if display in before]
    new = [row for row, (display, _) in zip(ordered, listed, strict=True) if display not in before]
    counts = Counter(key for row in new for key in tally(row))
    return summarise(str(out), counts, kept, time.monotonic() - start)


class _Job(NamedTuple):
    """What the actors need: where the files are, how to decode them, which model scores."""

    root: str
    how: Decoding
    limits: DecodeLimits
    model: str
    batch_size: int
    scope: ScopeRule


def _run(job: _Job, staging: Path, options: RayOptions) -> None:
    """The Ray Data pipeline: listing -> decode actors -> model actors -> Parquet parts, with
    the listing rows that earlier runs wrote filtered out by Ray's checkpoint."""
    import ray
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    if not ray.is_initialized():
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ScoringError(f"cannot reach Ray at {options.address}: {exc}") from None
    cpus = ray.cluster_resources().get("CPU", 1)
    decoders = options.decoders or max(1, int(cpus // 2))
    models = options.models or max(1, int(cpus // 2))
    # Actors claim three quarters of a CPU each: whole ones would leave the read and write
    # tasks none on a small machine (a pool as large as the cores starved the reader).
    actor_cpus = min(ACTOR_CPUS, 0.75 * cpus / (decoders + models))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.checkpoint_config = CheckpointConfig(
        id_column="path",
        checkpoint_path=str(staging / "checkpoint"),
        delete_checkpoint_on_success=False,
    )
    dataset = (
        _read_listing(staging / "listing")
        .map_batches(
            _Decoder,
            fn_constructor_args=(job.root, job.how, job.limits),
            compute=ray.data.ActorPoolStrategy(size=decoders),
            batch_size=job.batch_size,
            batch_format="numpy",
            num_cpus=actor_cpus,
        )
        .map_batches(
            _Scorer,
            fn_constructor_args=(job.model, job.batch_size, job.scope),
            compute=ray.data.ActorPoolStrategy(size=models),
            batch_size=job.batch_size,
            batch_format="numpy",
            num_cpus=actor_cpus,
        )
    )
    dataset.write_parquet(str(staging / "parts"), ray_remote_args={"num_cpus": TASK_CPUS})


def _listing(root: str, folder: Path) -> list[tuple[str, str]]:
    """The crawl in order, as (display path, path) pairs; written once as CSV shards (a resumed
    run reads the shards it wrote, so the files it owes are the ones it listed, whatever arrived
    since). The display path (``display_path``: valid UTF-8, unique) is the id Ray's checkpoint
    tracks; the path travels as the hex of its bytes, so that a name that is not UTF-8 reaches
    the decoder intact. CSV because Ray reads it into Arrow blocks, one per shard, which is
    what its checkpoint filter takes (its JSON reader gives pandas blocks)."""
    if not folder.is_dir():
        paths = list(crawl(root))
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = folder.with_name(folder.name + ".partial")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        for number, first in enumerate(range(0, max(len(paths), 1), LISTING_SHARD)):
            with open(building / f"{number:06d}.csv", "w", **CSV_FILE) as shard:
                writer = csv.writer(shard)
                writer.writerow(LISTING_COLUMNS)
                writer.writerows((display_path(path), os.fsencode(path).hex())
                                 for path in paths[first : first + LISTING_SHARD])  # fmt: skip
        building.rename(folder)
    pairs = []
    for shard in sorted(folder.iterdir()):
        with open(shard, **CSV_FILE) as handle:
            pairs += [(display, os.fsdecode(bytes.fromhex(raw)))
                      for display, raw in islice(csv.reader(handle), 1, None)]  # fmt: skip
    return pairs


def _read_listing(folder: Path):
    """The listing as a Ray dataset of strings (no type guessing: a file named 0001 stays
    text), with file names that hold line breaks read whole."""
    import pyarrow as pa
    import ray.data
    from pyarrow import csv as arrow_csv

    return ray.data.read_csv(
        str(folder),
        parse_options=arrow_csv.ParseOptions(newlines_in_values=True),
        convert_options=arrow_csv.ConvertOptions(
            column_types={name: pa.string() for name in LISTING_COLUMNS}
        ),
        ray_remote_args={"num_cpus": TASK_CPUS},
    )


def _parts(folder: Path, columns: list[str]) -> dict[str, list[str]]:
    """The rows the Parquet parts hold, by display path. A file a killed run wrote in a part
    whose checkpoint it did not record may be in two parts: rows are deterministic, the first
    is kept."""
    import pyarrow.parquet as pq

    found: dict[str, list[str]] = {}
    for part in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        table = pq.read_table(part, columns=columns).to_pydict()
        for values in zip(*(table[name] for name in columns), strict=True):
            found.setdefault(values[0], ["" if v is None else str(v) for v in values])
    return found


class _Decoder:
    """A Ray actor: paths -> model-size images, through a one-worker ``FolderPool`` so that
    the local path's limits hold and a decoder crash or hang is one error row."""

    def __init__(self, root: str, how: Decoding, limits: DecodeLimits) -> None:
        self._pool = FolderPool(
            root, decode_file, (how,), workers=1, expected=(ImageReadError,), limits=limits
        )
        self._pool.__enter__()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [os.fsdecode(bytes.fromhex(raw)) for raw in batch["raw"]]
        outcomes = list(self._pool.imap(paths, max_in_flight=4))
        return _to_columns(outcomes, [str(display) for display in batch["path"]])

    def __del__(self) -> None:
        self._pool.__exit__(None, None, None)


class _Scorer:
    """A Ray actor holding one predictor (the model loaded once per actor)."""

    def __init__(self, model: str, batch_size: int, scope: ScopeRule) -> None:
        from medtransfer.predictor import load_predictor

        self._predictor = load_predictor(model, batch_size=batch_size)
        self._columns = _columns(self._predictor.class_names)
        self._scope = scope

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = predict_rows(_from_columns(batch), self._predictor, self._scope)
        return {name: np.array([valid_utf8(row[i]) for row in rows], dtype=object)
                for i, name in enumerate(self._columns)}  # fmt: skip


def _to_columns(outcomes: Sequence[Outcome[Decoded]], ids: list[str]) -> dict[str, np.ndarray]:
    """Decoded files as Ray's numpy batch, under their display paths (``ids``): one array per
    field (pixels as one tensor column, zeros for an error row), the small fields as JSON text
    and error messages as valid UTF-8 (Parquet takes nothing else)."""
    shape = next((o.value.pixels.shape for o in outcomes if o.value is not None), (1, 1, 1))
    pixels = np.zeros((len(outcomes), *shape), np.float32)
    for i, outcome in enumerate(outcomes):
        if outcome.value is not None:
            pixels[i] = outcome.value.pixels
    meta = [
        json.dumps(None if o.value is None else [o.value.sop_instance_uid, list(o.value.tags),
                                                 o.value.header, list(o.value.intensity)])
        for o in outcomes
    ]  # fmt: skip
    return {
        "path": np.array(ids, dtype=object),
        "error": np.array([valid_utf8(o.error) for o in outcomes], dtype=object),
        "meta": np.array(meta, dtype=object),
        "pixels": pixels,
    }


def _from_columns(batch: dict[str, Any]) -> list[Outcome[Decoded]]:
    outcomes = []
    for path, error, meta, pixels in zip(
        batch["path"], batch["error"], batch["meta"], batch["pixels"], strict=True
    ):
        fields = json.loads(meta)
        if fields is None:
            outcomes.append(Outcome(str(path), None, str(error)))
            continue
        uid, tags, header, intensity = fields
        value = Decoded(np.asarray(pixels), uid, tuple(tags), header, tuple(intensity))
        outcomes.append(Outcome(str(path), value, ""))
    return outcomes


def _columns(class_names: Sequence[str]) -> list[str]:
    return [*BASE_COLUMNS, *SCOPE_COLUMNS, *INTENSITY_COLUMNS, *prob_columns(class_names)]
