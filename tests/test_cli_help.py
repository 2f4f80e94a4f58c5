"""The first hour of a new user: every verb's --help explains itself with a description, real
examples and its defaults, and commands open without TensorFlow's start-up chatter."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from medtransfer import cli

CLI = Path(sys.executable).parent / "medtransfer"


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every verb the parser has, nested ones (``weights download``) included: a verb added
    later is held to the same help rules without editing this file."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = []
    for name, sub in subs[0].choices.items() if subs else []:
        names += [f"{prefix}{name}", *_verbs(sub, f"{prefix}{name} ")]
    return names


VERBS = _verbs(cli.build_parser())


def verb_parser(verb: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for word in verb.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def examples(text: str, verb: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip().startswith(f"medtransfer {verb} ") or line.strip() == f"medtransfer {verb}"
    ]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_a_description_and_examples_that_parse(verb):
    parser = verb_parser(verb)
    text = parser.format_help()
    assert parser.description and len(parser.description.split()) >= 8, verb
    assert "Example" in text
    commands = examples(parser.epilog or "", verb)
    assert commands, f"{verb}: no example command in the epilog"
    for command in commands:
        args = cli.build_parser().parse_args(shlex.split(command)[1:])
        assert args.command == verb.split()[0]


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_default_worth_showing_is_shown(verb):
    parser = verb_parser(verb)
    formatter = parser._get_formatter()
    for action in parser._actions:
        shown = action.default is not None and action.default is not False
        if action.option_strings and shown and action.default != argparse.SUPPRESS:
            assert "default" in formatter._expand_help(action), (verb, action.option_strings)


@pytest.mark.parametrize(
    "verb, fragments",
    [
        ("evaluate", ["split to evaluate on (default: test)", "(default: 2000)"]),
        ("ensemble", ["(default: mean)"]),
        ("score", ["(default: 2)", "(default: 16)"]),
        ("quickstart", ["(default: 15)", "(default: 160)", "(default: resnet50)"]),
        ("lr-find", ["(default: 1e-07)", "(default: 100)", "full (whole"]),
        ("train", ["run:DIR", "imagenet", "none"]),
        ("weights download", ["(default: .)"]),
    ],
)
def test_the_defaults_users_ask_about_are_listed(verb, fragments):
    text = " ".join(verb_parser(verb).format_help().split())  # argparse wraps lines
    for fragment in fragments:
        assert fragment in text, (verb, fragment)


def test_quickstart_help_states_the_defaults_it_uses():
    from medtransfer.quickstart import DEFAULTS

    text = " ".join(verb_parser("quickstart").format_help().split())
    assert f"training epochs (default: {DEFAULTS['epochs']})" in text
    assert f"synthetic patients (default: {DEFAULTS['n_patients']})" in text
    assert f"backbone (default: {DEFAULTS['backbone']})" in text


def test_top_level_help_shows_the_workflow():
    text = subprocess.run([str(CLI), "--help"], capture_output=True, text=True).stdout
    for verb in ("quickstart", "train", "evaluate", "export", "score"):
        assert f"  medtransfer {verb} " in text
    assert "Transfer learning for medical imaging" in text


def test_the_contract_is_unchanged():
    """Option names, defaults and choices are a contract; help text may change, they may not."""
    evaluate = verb_parser("evaluate").parse_args(["r", "--out", "o"])
    assert (evaluate.split, evaluate.bootstrap, evaluate.workers) == ("test", 2000, None)
    score = verb_parser("score").parse_args(["d", "--model", "m", "--out", "o"])
    assert (score.workers, score.batch_size) == (2, 16)
    quick = verb_parser("quickstart").parse_args(["--out", "o"])
    assert (quick.epochs, quick.patients, quick.backbone, quick.seed) == (None, None, None, 0)
    assert verb_parser("ensemble").parse_args(["a", "--out", "o"]).method == "mean"
    phase = next(a for a in verb_parser("lr-find")._actions if "--phase" in a.option_strings)
    assert list(phase.choices) == ["head", "fine_tune", "full"] and phase.default is None


STARTUP_NOISE = ("oneDNN", "cuda_", "cudart", "cuInit", "absl::InitializeLog", "cpu_feature")


def stderr_of(*args: str, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    clean.pop("MEDTRANSFER_DEBUG", None)
    result = subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=300, env={**clean, **env}
    )
    return result.returncode, result.stderr


def test_backbones_prints_no_tensorflow_startup_lines():
    code, stderr = stderr_of("backbones")
    assert code == 0 and not any(word in stderr for word in STARTUP_NOISE), stderr


def test_a_tensorflow_verb_fails_in_one_line_without_startup_lines(tmp_path):
    code, stderr = stderr_of("lr-find", "--spec", str(tmp_path / "no.yaml"), "--out", "x")
    assert code == 2
    assert stderr.splitlines() == [
        f"medtransfer lr-find: error: {tmp_path / 'no.yaml'}: cannot read spec: No such file or "
        "directory"
    ]


@pytest.mark.parametrize(
    "env",
    [
        {"TF_CPP_MIN_LOG_LEVEL": "0"},
        pytest.param({"MEDTRANSFER_DEBUG": "1"}, marks=pytest.mark.slow),  # same path, ~12 s
    ],
)
def test_the_user_can_get_tensorflows_log_back(tmp_path, env):
    code, stderr = stderr_of("lr-find", "--spec", str(tmp_path / "no.yaml"), "--out", "x", **env)
    assert code == 2 and "oneDNN" in stderr


def test_only_startup_noise_is_filtered():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796500847.538055   19108 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1796500847.538306   19108 cudart_stub.cc:31] Could not find cuda drivers",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild",
    ]
    real = [
        "E0000 00:00:1796500883.986343   19336 op_kernel.cc:1841] OP_REQUIRES failed",
        "Traceback (most recent call last):",
        "medtransfer train: error: something",
    ]
    assert all(cli._STARTUP_NOISE.match(line) for line in noise)
    assert not any(cli._STARTUP_NOISE.match(line) for line in real)
    cuinit = "E0000 00:00:1.9   19336 cuda_platform.cc:52] failed call to cuInit: INTERNAL: x"
    assert cli._NO_GPU_NOISE.match(cuinit) and not cli._NO_GPU_NOISE.match(real[0])
