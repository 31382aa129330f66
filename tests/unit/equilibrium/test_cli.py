"""The ``equilibrium`` command's process-wide defaults."""

from __future__ import annotations

import os

import pytest

from equilibrium import cli


def test_numpy_math_is_single_threaded_unless_the_operator_chose(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cli.MATH_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the operator's choice stands
    assert cli.main([]) == 2  # no subcommand: the help, and the defaults already set
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    assert os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "4"


@pytest.mark.parametrize(("argv", "prog"), [
    (["sidecar", "--bogus", "1"], "equilibrium sidecar"),
    (["signaler", "--nope"], "equilibrium signaler"),
    (["injector", "controller", "--bogus"], "equilibrium injector controller"),
    (["--bogus"], "equilibrium"),
])
def test_an_unknown_option_is_told_by_the_parser_it_was_given_to(
    argv: list[str], prog: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    unknown = " ".join(word for word in argv if word.startswith("-"))
    assert f"{prog}: error: unrecognized arguments: {unknown}" in err
    assert err.startswith(f"usage: {prog} ")


def test_output_cut_short_by_its_reader_ends_quietly() -> None:
    # The stranger's finding: `equilibrium init --dry-run | head -1` printed a traceback
    # about half the time. A reader that closes the pipe at once is the same case, always.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "equilibrium", "init", "--dry-run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # nothing will be read
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
