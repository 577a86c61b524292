import json
import math

import numpy as np
import pytest
import torch

from attnlab.io import atomic_write_text, dumps, read_json, strict_json_value, write_json


def test_non_finite_numbers_become_null_everywhere():
    payload = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": {"d": (2, float("nan"))},
               "t": torch.tensor(float("nan")), "n": np.float32(1.5), "arr": np.array([1.0, np.nan])}
    value = strict_json_value(payload)
    assert value == {"a": None, "b": [1.0, None, None], "c": {"d": [2, None]}, "t": None, "n": 1.5,
                     "arr": [1.0, None]}
    text = dumps(payload)

    def refuse(token):  # a strict reader: NaN / Infinity are not JSON
        raise ValueError(token)

    json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"loss": math.nan, "steps": 3})
    assert json.loads(path.read_text()) == {"loss": None, "steps": 3}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
    assert read_json(path) == {"loss": None, "steps": 3}


def test_read_json_of_a_missing_or_torn_file_is_none(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"status": "compl')
    assert read_json(tmp_path / "torn.json") is None


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("attnlab.io.os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]
