"""Hostile archives: every file one row; nothing hangs, crashes, exhausts memory or breaks a table.

Each case is built from real files (``../shared/data/dicom`` and pydicom's test files) the way it
was met in archives: a bit-flipped Transfer Syntax UID, decompression bombs, a JPEG 2000 file whose
mutated codestream makes the decoder grow without end, a FIFO, a symlink loop, an unreadable
subfolder, file names that are spreadsheet formulas or not UTF-8, two runs on one output. A
deterministic stand-in predictor keeps TensorFlow out of the scoring tests; the exit-code tests
run the real CLI on a real (tiny) run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
from PIL import Image

from medtransfer import cli
from medtransfer.folder_output import OutputBusyError, OutputLock, display_path, safe_cell
from medtransfer.folder_pool import DecodeLimits, FolderPool, crawl
from medtransfer.inspect import inspect_folder
from medtransfer.scoring import score_folder
from tests.test_scoring import MeanPredictor, check_scores

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "data" / "dicom" / "corpus"
CLI = Path(sys.executable).with_name("medtransfer")
FORMULA_NAMES = ['=HYPERLINK("x.example","y").png', "+SUM(1).png", "@cmd.png", "-2+3.png"]
UNDECODABLE_NAME = b"caf\xe9.png"  # Latin-1, not UTF-8
BACKSLASH_NAME = "caf\\xe9.png"  # a valid name that looks like the escaped one


# --- building the hostile files -------------------------------------------------------------------


def bad_transfer_syntax(target: Path) -> None:
    """693_UNCI.dcm with one digit of its Transfer Syntax UID flipped: 1.2.840.10008.1.2.1 becomes
    1.2.840.10008.1.2.7, which names no transfer syntax."""
    raw = (CORPUS / "693_UNCI.dcm").read_bytes()
    uid = b"1.2.840.10008.1.2.1\x00"
    assert raw.count(uid) == 1
    target.write_bytes(raw.replace(uid, b"1.2.840.10008.1.2.7\x00"))


def runaway_jpeg2000(target: Path) -> None:
    """693_J2KR.dcm with two bytes of its codestream header changed (found by mutating it): the
    decoder then grows past 10 GB at full speed for as long as it is let run."""
    raw = bytearray((CORPUS / "693_J2KR.dcm").read_bytes())
    assert (raw[1703], raw[1822]) == (0, 31)
    raw[1703], raw[1822] = 99, 197
    target.write_bytes(bytes(raw))


def slow_jpeg2000(target: Path) -> None:
    """693_J2KR.dcm with three bytes of its codestream header changed (found by mutating it).

    Its codestream claims 1.8 G pixels: without a memory cap the decoder runs ~12 s, growing by
    ~0.4 GB/s, before it fails; under the default 4 GiB cap it fails in ~1.6 s."""
    raw = bytearray((CORPUS / "693_J2KR.dcm").read_bytes())
    assert (raw[1703], raw[1760], raw[1835]) == (0, 136, 51)
    raw[1703], raw[1760], raw[1835] = 55, 10, 129
    target.write_bytes(bytes(raw))


def size_bomb(source: Path, target: Path) -> None:
    """A real compressed file whose header claims 65535 x 65535 pixels."""
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = 65535
    ds.save_as(target)


def png(path: Path | bytes, value: int, size: int = 16) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())


def digest(folder: Path) -> dict[str, str]:
    """Content hashes of the regular files: inputs must never change."""
    found = {}
    for rel in crawl(folder):
        path = folder / rel
        if path.is_file() and not path.is_symlink():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "archive"
    (folder / "good").mkdir(parents=True)
    for name in ("693_UNCI.dcm", "CT1_JLSN.dcm", "MR2_J2KR.dcm"):
        shutil.copy(CORPUS / name, folder / "good" / name)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), folder / "good" / "ct_small.dcm")
    bad = folder / "bad"
    bad.mkdir()
    bad_transfer_syntax(bad / "flipped_ts.dcm")
    runaway_jpeg2000(bad / "runaway_j2k.dcm")
    size_bomb(CORPUS / "CT1_JLSN.dcm", bad / "bomb_jpegls.dcm")
    size_bomb(CORPUS / "MR2_J2KR.dcm", bad / "bomb_j2k.dcm")
    size_bomb(Path(pydicom.data.get_testdata_file("MR_small_RLE.dcm")), bad / "bomb_rle.dcm")
    os.mkfifo(bad / "x.dcm")
    os.symlink("loop.dcm", bad / "loop.dcm")
    names = folder / "names"
    names.mkdir()
    for i, name in enumerate(FORMULA_NAMES):
        png(folder / name, 40 * i)
    png(os.path.join(os.fsencode(names), UNDECODABLE_NAME), 10)
    png(names / BACKSLASH_NAME, 20)
    return folder


EXPECTED_ERRORS = {
    "bad/flipped_ts.dcm": "1.2.840.10008.1.2.7",
    "bad/bomb_jpegls.dcm": "too large",
    "bad/bomb_j2k.dcm": "too large",
    "bad/bomb_rle.dcm": "too large",
    "bad/x.dcm": "not a regular file: a FIFO (named pipe)",
    "bad/loop.dcm": "cannot read file: Too many levels of symbolic links",
    # The codestream claims ~3.3 G pixels: the worker's memory cap turns the runaway into a
    # failed allocation, and the decoder's error names the size.
    "bad/runaway_j2k.dcm": "JPEG 2000 decode failed",
}


def read_table(out: Path) -> pd.DataFrame:
    raw = out.read_bytes()
    raw.decode("utf-8")  # valid UTF-8, or this raises
    return pd.read_csv(out, dtype=str, keep_default_na=False)


REPO = Path(__file__).resolve().parents[1]
SCORE_AND_MEASURE = """
import json, resource, sys, time
from medtransfer.scoring import score_folder
from tests.test_scoring import MeanPredictor
start = time.monotonic()
s = score_folder(sys.argv[1], MeanPredictor(), sys.argv[2], workers=2, batch_size=4, progress=False)
peak = max(resource.getrusage(w)[2] for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"counts": [s.n_files, s.n_ok, s.n_error], "exit_code": s.exit_code,
                  "seconds": time.monotonic() - start, "peak_rss_gib": peak / 2**20}))
"""


@pytest.fixture(scope="module")
def scored(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Scored in a process of its own, so that its peak memory (and its workers') is its own."""
    before = digest(archive)
    out = tmp_path_factory.mktemp("scored") / "scores.csv"
    # Forked by a shell, not by this pytest worker: Linux carries ru_maxrss across fork and
    # exec, so a process this (TensorFlow-laden, GiB-sized) worker started directly would
    # report the worker's peak as its own. The shell is small and forks the scorer.
    result = subprocess.run(
        ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", SCORE_AND_MEASURE,
         str(archive), str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout), "table": read_table(out), "before": before, "out": out}


# --- score over the hostile archive ---------------------------------------------------------------


def test_every_file_is_one_row_in_bounded_time_and_memory(archive: Path, scored: dict) -> None:
    table = scored["table"]
    assert len(table) == len(list(crawl(archive))) == 17
    assert table.path.is_unique
    assert scored["seconds"] < 60  # the runaway file alone once ran for minutes
    assert scored["peak_rss_gib"] < 2  # the bombs asked for 8-23 GiB
    assert scored["counts"] == [17, 10, 7]
    assert scored["exit_code"] == 1


def test_each_hostile_file_gets_a_readable_reason(scored: dict) -> None:
    rows = scored["table"].set_index("path")
    errors = rows[rows.status == "error"]
    assert set(errors.index) == set(EXPECTED_ERRORS)
    for path, reason in EXPECTED_ERRORS.items():
        assert reason in errors.error[path], (path, errors.error[path])
    assert (errors[["prob_low", "prob_high"]] == "").all().all()
    ok = rows[rows.status == "ok"]
    top = {p.split("/")[0] for p in ok.index}
    assert top == {"good", "names"} | {"'" + name for name in FORMULA_NAMES}


def test_the_table_is_safe_in_a_spreadsheet(scored: dict) -> None:
    table = scored["table"]
    for cell in table.to_numpy().ravel():
        assert not cell.startswith(("=", "+", "-", "@")) or is_number(cell), cell
    paths = set(table.path)
    assert {"'" + name for name in FORMULA_NAMES} <= paths
    # the Latin-1 name is escaped reversibly, and cannot be confused with a real backslash name
    assert {"names/caf\\xe9.png", "names/caf\\\\xe9.png"} <= paths


def test_inputs_are_untouched(archive: Path, scored: dict) -> None:
    assert digest(archive) == scored["before"]
    assert os.path.exists(archive / "bad" / "x.dcm") and not os.path.isfile(
        archive / "bad" / "x.dcm"
    )


def test_the_contract_checker_passes_on_the_plain_part(archive: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(archive / "good", plain / "good")
    for name in ("flipped_ts.dcm", "bomb_rle.dcm", "runaway_j2k.dcm"):
        shutil.copy(archive / "bad" / name, plain / name)
    out = tmp_path / "scores.csv"
    score_folder(plain, MeanPredictor(), out, workers=2, progress=False)
    result = check_scores(plain, out)
    assert result.returncode == 0, result.stdout


def test_parquet_output_takes_the_same_rows(archive: Path, scored: dict, tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    score_folder(archive, MeanPredictor(), out, workers=2, batch_size=4, progress=False)
    table = pd.read_parquet(out)
    assert list(table.path) == list(scored["table"].path)
    assert list(table.status) == list(scored["table"].status)


def test_resume_keeps_escaped_rows_and_scores_nothing_twice(
    archive: Path, scored: dict, tmp_path: Path
) -> None:
    out = tmp_path / "scores.csv"
    shutil.copy(scored["out"], out)
    summary = score_folder(archive, MeanPredictor(), out, workers=2, resume=True, progress=False)
    assert (summary.n_files, summary.n_resumed) == (17, 17)
    assert out.read_bytes() == scored["out"].read_bytes()


def test_inspect_gives_the_same_one_row_per_file(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "qa.csv"
    summary = inspect_folder(archive, out, workers=2, progress=False)
    table = read_table(out)
    assert list(table.path) == list(read_table_paths(archive))
    assert summary.by_status["error"] == 7 and summary.exit_code == 1
    bombs = table.set_index("path").loc[["bad/bomb_rle.dcm", "bad/bomb_j2k.dcm"]]
    assert list(bombs.rows) == ["65535", "65535"]  # the header's tags are still reported


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_table_paths(archive: Path) -> list[str]:
    return [safe_cell(display_path(rel)) for rel in crawl(archive)]


def test_an_unreadable_subfolder_is_one_error_row(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads every folder, so the refusal is simulated where the crawl asks the kernel.
    real_scandir = os.scandir

    def scandir(path=".", *args):
        if os.fspath(path).rstrip("/").endswith("archive/names"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "scores.csv"
    score_folder(archive, MeanPredictor(), out, workers=1, progress=False)
    rows = read_table(out).set_index("path")
    assert rows.loc["names/", "error"] == "cannot list folder: Permission denied"
    assert not any(path.startswith("names/") and path != "names/" for path in rows.index)
    assert len(rows) == 17 - 2 + 1


# --- the pool's own limits ------------------------------------------------------------------------


def sleeps_on_hang(path: str) -> str:
    """The FolderPool function for the time-limit test: a file named hang* never finishes."""
    if os.path.basename(path).startswith("hang"):
        time.sleep(3600)
    return os.path.basename(path)


def test_a_hanging_file_times_out_and_the_others_still_run(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b", "hang1", "c", "hang2", "d", "e"):
        (folder / name).write_text(name)
    start = time.monotonic()
    with FolderPool(str(folder), sleeps_on_hang, workers=2, limits=DecodeLimits(timeout=2)) as pool:
        outcomes = list(pool.imap(crawl(folder), max_in_flight=6))
    assert time.monotonic() - start < 30
    assert [(o.path, o.value, o.error) for o in outcomes] == [
        ("a", "a", ""),
        ("b", "b", ""),
        ("c", "c", ""),
        ("d", "d", ""),
        ("e", "e", ""),
        ("hang1", None, "decode timed out after 2 s"),
        ("hang2", None, "decode timed out after 2 s"),
    ]


def test_a_real_file_past_the_time_limit_is_an_error_row(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(CORPUS / "693_J2KR.dcm", folder / "a.dcm")
    slow_jpeg2000(folder / "b.dcm")
    shutil.copy(CORPUS / "CT1_JLSN.dcm", folder / "c.dcm")
    out = tmp_path / "scores.csv"
    limits = DecodeLimits(timeout=2, memory=None)  # the time limit alone must stop it
    start = time.monotonic()
    summary = score_folder(folder, MeanPredictor(), out, workers=2, limits=limits, progress=False)
    assert time.monotonic() - start < 8  # the file alone takes ~12 s
    rows = read_table(out).set_index("path")
    assert list(rows.status) == ["ok", "error", "ok"]
    assert rows.loc["b.dcm", "error"] == "decode timed out after 2 s"
    assert summary.exit_code == 1


def allocates(path: str) -> int:
    """The FolderPool function for the memory-cap test: allocate what the file names, in MiB."""
    return len(bytearray(int(Path(path).read_text()) * 2**20))


def test_the_worker_memory_cap_turns_a_huge_allocation_into_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "big").write_text("6000")
    (folder / "small").write_text("10")
    limits = DecodeLimits(memory=2**31)
    with FolderPool(str(folder), allocates, workers=1, limits=limits) as pool:
        outcomes = {o.path: (o.value, o.error) for o in pool.imap(crawl(folder), 2)}
    assert outcomes == {
        "big": (None, "out of memory: decoding needs more than the worker memory limit"),
        "small": (10 * 2**20, ""),
    }


# --- one writer per output ------------------------------------------------------------------------


def test_a_second_run_on_a_locked_output_stops_at_once(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    held = OutputLock(out)
    try:
        with pytest.raises(OutputBusyError, match="another run is writing"):
            score_folder(archive / "good", MeanPredictor(), out, workers=0, progress=False)
        with pytest.raises(OutputBusyError):
            inspect_folder(archive / "good", out, workers=0, progress=False)
        assert not out.exists() and not out.with_name("scores.csv.partial").exists()
    finally:
        held.release()
    summary = score_folder(archive / "good", MeanPredictor(), out, workers=0, progress=False)
    assert summary.n_ok == 4 and not out.with_name("scores.csv.lock").exists()


def test_two_concurrent_runs_one_wins_and_its_table_is_whole(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        png(folder / f"{i:02d}.png", i)
    out = tmp_path / "scores.csv"
    script = (
        "import sys; from medtransfer.scoring import score_folder; "
        "from tests.test_scoring import MeanPredictor; "
        f"s = score_folder({str(folder)!r}, MeanPredictor(0.02), {str(out)!r}, workers=0, "
        "batch_size=4, progress=False); print(s.n_ok)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [run.communicate(timeout=120) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 1], results
    winner = next(out for (out, _), run in zip(results, runs, strict=True) if run.returncode == 0)
    loser = next(err for (_, err), run in zip(results, runs, strict=True) if run.returncode)
    assert winner.strip() == "40" and "another run is writing" in loser
    assert len(read_table(out)) == 40


# --- cells ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("=1+2", "'=1+2"),
        ("+cmd", "'+cmd"),
        ("-cmd", "'-cmd"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("'=x", "''=x"),
        ("-600", "-600"),
        ("+1.5", "+1.5"),
        ("-inf", "'-inf"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_formula_cells_are_neutralised_and_numbers_kept(text: str, cell: str) -> None:
    assert safe_cell(text) == cell


def test_display_paths_are_unique_and_valid_utf8() -> None:
    names = [os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png", "caf\u00e9.png", "plain.png"]
    shown = [display_path(name) for name in names]
    assert shown == ["caf\\xe9.png", "caf\\\\xe9.png", "caf\u00e9.png", "plain.png"]
    for text in shown:
        text.encode("utf-8")


# --- exit codes of the real CLI -------------------------------------------------------------------


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=300, **kw)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("medtransfer ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_exit_codes_distinguish_done_usage_and_busy(archive: Path, tiny_run: Path, tmp_path):
    out = tmp_path / "scores.csv"
    good = run_cli("score", str(archive / "good"), "--model", str(tiny_run), "--out", str(out))
    assert good.returncode == 0, good.stderr
    errors = run_cli("score", str(archive / "bad"), "--model", str(tiny_run), "--out", str(out))
    assert errors.returncode == 1 and len(read_table(out)) == 7
    held = OutputLock(out)
    try:
        busy = run_cli("score", str(archive / "good"), "--model", str(tiny_run), "--out", str(out))
    finally:
        held.release()
    assert busy.returncode == 2 and "another run is writing" in one_line(busy.stderr)


def mount_tmpfs_and_score(archive: Path, run: Path, options: str) -> subprocess.CompletedProcess:
    """Score into a tiny tmpfs in a private mount namespace (gone with the command)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a private tmpfs")
    script = (
        'set -e; mnt=$(mktemp -d); mount -t tmpfs -o "$1" tmpfs "$mnt"; '
        f'exec {CLI} score "$2" --model "$3" --out "$mnt/scores.csv" --no-progress'
    )
    command = ["unshare", "--mount", "sh", "-c", script, "sh", options, str(archive), str(run)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_cli_full_disk_is_a_failure_not_a_finished_run(archive: Path, tiny_run: Path) -> None:
    result = mount_tmpfs_and_score(archive, tiny_run, "size=4k")
    assert result.returncode == 3, result.stderr
    assert "failed: No space left on device" in one_line(result.stderr)


def test_cli_read_only_output_is_a_failure(archive: Path, tiny_run: Path) -> None:
    result = mount_tmpfs_and_score(archive, tiny_run, "ro")
    assert result.returncode == 3, result.stderr
    assert "failed: Read-only file system" in one_line(result.stderr)


def test_cli_ctrl_c_prints_one_line(archive: Path, tiny_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(800):  # a minute of JPEG 2000 decoding or more: still running when Ctrl-C comes
        os.symlink(CORPUS / "MR2_J2KR.dcm", folder / f"{i:03d}.dcm")
    out = tmp_path / "scores.csv"
    command = [str(CLI), "score", str(folder), "--model", str(tiny_run), "--out", str(out),
               "--no-progress"]  # fmt: skip
    # A process started in the background by a non-interactive shell (as CI may run pytest)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: restore it.
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not out.with_name("scores.csv.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        # Python loses a Ctrl-C that lands inside a finalizer (``__del__``, a weakref callback:
        # "Exception ignored in ...", as TensorFlow's objects have): an operator presses again.
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted; what was written is kept: rerun with --resume" in one_line(stderr)


def test_cli_ctrl_c_lost_in_a_finalizer_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Finalized:
        def __init__(self, error: type[BaseException]) -> None:
            self.error = error

        def __del__(self) -> None:
            raise self.error("raised in __del__")

    def inspect_dropping_two_objects(*args, **kwargs):
        Finalized(KeyboardInterrupt)  # a Ctrl-C landing in a finalizer: Python loses it
        Finalized(ValueError)  # any other error still reaches the hook
        raise ValueError("done")

    reported: list[type[BaseException]] = []
    monkeypatch.setattr(
        sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_type)
    )
    monkeypatch.setattr("medtransfer.inspect.inspect_folder", inspect_dropping_two_objects)
    cli.main(["inspect", str(tmp_path), "--out", str(tmp_path.parent / "qa.csv")])
    assert reported == [ValueError]
    assert sys.unraisablehook.__name__ == "<lambda>"  # restored when main returns


def test_cli_crash_is_exit_3_in_one_line_without_the_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("PatientName=DOE^JANE")  # a message that may quote PHI

    monkeypatch.setattr("medtransfer.inspect.inspect_folder", crash)
    code = cli.main(["inspect", str(tmp_path), "--out", str(tmp_path.parent / "qa.csv")])
    err = capsys.readouterr().err
    assert code == 3
    assert "failed: internal error RuntimeError at test_hostile_inputs.py" in err
    assert "DOE" not in err
