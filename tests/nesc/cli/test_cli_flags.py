"""The flags every verb shares (``nesc/cli/flags.py``): one output flag ``-o/--out`` (the old ``export
--onnx`` still works, with a deprecation note), MODEL required with a usage error that lists the
registry models, ``--help`` in argument groups, and every flag's help saying its default. Parsing
only: no model is built here."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nesc.cli import USAGE_ERROR, build_parser
from nesc.models import list_models
from cli_cases import run as _run, assert_clean_error

WRITERS = ("compress", "compile", "export")  # the verbs that write a file
VERBS = ("summary", "compress", "compile", "export", "train")  # search is nesc/cli/search.py's own


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


@pytest.mark.parametrize("verb", WRITERS)
@pytest.mark.parametrize("flag", ["-o", "--out"])
def test_every_writer_takes_o_and_out(verb: str, flag: str) -> None:
    args = build_parser().parse_args([verb, "mlp", flag, "m.x"])
    assert args.out == Path("m.x")


def test_export_onnx_still_works_with_a_deprecation_note(capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["export", "mlp", "--onnx", "m.onnx"])
    assert args.out == Path("m.onnx")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--onnx is deprecated" in err and "-o/--out" in err
    assert "--onnx" not in _verb_parser("export").format_help()  # hidden: the help shows one spelling


@pytest.mark.parametrize("verb", VERBS)
def test_a_missing_model_is_a_usage_error_listing_the_models(capsys: pytest.CaptureFixture, verb: str) -> None:
    code, out, err = _run(capsys, verb, "-o", "x.so") if verb in WRITERS else _run(capsys, verb)
    assert code == USAGE_ERROR and out == ""
    assert_clean_error(err, f"nesc {verb} needs MODEL", *list_models())


def test_a_usage_error_of_argparse_has_the_same_exit_code(capsys: pytest.CaptureFixture) -> None:
    assert _run(capsys, "compress", "mlp", "--ratio")[0] == USAGE_ERROR  # argparse: --ratio needs a value


@pytest.mark.parametrize("verb, groups", [
    ("compress", ["model and input:", "compression plan:", "training:", "output:"]),
    ("compile", ["model and input:", "compression plan:", "backend:", "output:"]),
    ("export", ["model and input:", "compression plan:", "backend:", "output:"]),
    ("summary", ["model and input:", "compression plan:", "output:"]),
    ("train", ["model and input:", "training:", "output:"]),
])
def test_help_is_grouped(verb: str, groups: list[str]) -> None:
    text = _verb_parser(verb).format_help()
    positions = [text.find("\n" + g + "\n") for g in groups]
    assert -1 not in positions and positions == sorted(positions), text
    if "compression plan:" in groups:  # the plan's flags are listed under their heading
        assert text.index("\n  --ratio R") > text.index("\ncompression plan:\n"), text


@pytest.mark.parametrize("verb", VERBS)
def test_every_flag_says_its_default(verb: str) -> None:
    missing = [a.option_strings or a.dest for a in _verb_parser(verb)._actions
               if a.help not in (None, argparse.SUPPRESS) and not isinstance(a, argparse._HelpAction)
               and "default" not in a.help and "required" not in a.help]
    assert not missing, f"nesc {verb}: help without its default: {missing}"
