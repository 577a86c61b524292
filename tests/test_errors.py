import pytest

from attnlab.config import ConfigError
from attnlab.errors import InputError, one_line_errors


def test_bad_input_is_one_line_on_stderr_and_exit_status_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise InputError("data: no such folder\n  set paths.data_dir")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: data: no such folder set paths.data_dir\n"


def test_hydra_full_error_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError, match="optim.lr"), one_line_errors():
        raise ConfigError("optim.lr", -1.0, "a number > 0")


def test_other_errors_are_not_bad_input(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ZeroDivisionError), one_line_errors():
        1 / 0


def test_report_of_a_missing_sweep_directory(tmp_path, capsys, monkeypatch):
    from attnlab.cli import report

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        report([str(tmp_path / "nothing")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: no such sweep directory: {tmp_path / 'nothing'}"]
