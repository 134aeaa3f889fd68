"""The CLI convention (datastore/cli_common.py) and the draft-budget defaults the CLIs share."""
from __future__ import annotations

import tempfile
from importlib import metadata

import pytest

from specstore.client.budget import MAX_BUDGET_CPU, MAX_BUDGET_CUDA, BudgetController, CostProfile, default_max_budget
from specstore.client.cli_support import MAX_BUDGET_HELP, choose_max_budget
from specstore.datastore.cli_common import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, CliParser, UsageError,
                                            one_line, package_version, run_cli)


def _raise(exc: BaseException):
    def body() -> int:
        raise exc
    return body


def test_statuses():
    assert (EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED) == (1, 2, 130)
    assert run_cli("prog", lambda: 0) == 0
    assert run_cli("prog", lambda: 7) == 7  # a command's own status passes through


@pytest.mark.parametrize("exc", [ValueError("bad\nvalue"), FileNotFoundError("gone"), UsageError("--x must be > 0")])
def test_input_errors_are_one_line_and_exit_2(exc, capsys):
    assert run_cli("prog", _raise(exc)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: ") and "Traceback" not in err
    assert one_line(str(exc)) in err


def test_command_specific_input_errors(capsys):
    class BuildError(RuntimeError):
        pass

    assert run_cli("prog", _raise(BuildError("no")), input_errors=(BuildError,)) == EXIT_USAGE
    assert capsys.readouterr().err == "prog: error: no\n"


def test_internal_error_points_at_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_cli("prog", _raise(RuntimeError("kaput"))) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("prog: internal error: RuntimeError: kaput (full traceback in ")
    (log,) = tmp_path.glob("prog-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: kaput" in text


def test_ctrl_c_exits_130(capsys):
    assert run_cli("prog", _raise(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted\n"
    assert run_cli("prog", _raise(KeyboardInterrupt()), interrupt_hint="rerun to resume") == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted; rerun to resume\n"


def test_system_exit_passes_through():
    with pytest.raises(SystemExit):
        run_cli("prog", _raise(SystemExit(3)))


def test_parser_version_and_one_line_usage_errors(capsys):
    p = CliParser(prog="prog")
    p.add_argument("--n", type=int, required=True)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("go")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"prog {metadata.version('specstore')}\n" == f"prog {package_version()}\n"
    for argv in ([], ["--n", "x"], ["--n", "1", "go", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("prog: error: ") and err.rstrip().endswith("--help)")


def test_draft_budget_defaults_are_one_constant_per_device():
    assert (MAX_BUDGET_CPU, MAX_BUDGET_CUDA) == (32, 63)  # the values before the constants existed
    assert default_max_budget("cpu") == MAX_BUDGET_CPU
    assert default_max_budget("cuda") == MAX_BUDGET_CUDA
    assert f"<= {MAX_BUDGET_CPU} on CPU" in MAX_BUDGET_HELP and f"<= {MAX_BUDGET_CUDA} on CUDA" in MAX_BUDGET_HELP
    assert BudgetController(CostProfile.flat(100)).max_budget == MAX_BUDGET_CUDA


def test_choose_max_budget():
    import torch

    model = torch.nn.Linear(2, 2)  # on the CPU
    assert choose_max_budget(None, model, CostProfile.flat(65)) == MAX_BUDGET_CPU
    assert choose_max_budget(0, model, CostProfile.flat(65)) == MAX_BUDGET_CPU  # 0 = the default, as before
    assert choose_max_budget(None, model, CostProfile.flat(17)) == 16       # what the profile measured
    assert choose_max_budget(50, model, CostProfile.flat(17)) == 50          # an explicit value is kept
