import pytest
import torch

from attnlab import checkpoint
from attnlab.checkpoint import AtomicCheckpointIO, atomic_torch_save


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def torn_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_plugin_round_trip_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 7, "attnlab": {"rng": {"torch": torch.get_rng_state()}}}
    io.save_checkpoint(state, tmp_path / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "missing.ckpt")


def test_lightning_checkpoint_of_lit_module_loads_weights_only(tmp_path):
    """Everything attnlab puts in a checkpoint (hyper-parameters, RNG states, curves) is weights_only-safe."""
    from attnlab.lit_module import LitLM
    from tests.conftest import TINY_MODEL

    module = LitLM(TINY_MODEL, {"name": "gqa", "n_kv_heads": 2}, {})
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    atomic_torch_save(ckpt, tmp_path / "m.ckpt")
    loaded = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert loaded["hyper_parameters"]["attention"] == {"name": "gqa", "n_kv_heads": 2}
    module.on_load_checkpoint(loaded)


def _state(value: float) -> dict:
    return {"state_dict": {"w": torch.full((3,), value), "steps": torch.tensor(3)}, "global_step": 3}


def test_checkpoint_plugin_refuses_non_finite_weights(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_state(1.0), tmp_path / "last.ckpt")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(checkpoint.NonFiniteCheckpointError, match=r"refusing to write .*last\.ckpt.*\bw\b"):
            io.save_checkpoint(_state(bad), tmp_path / "last.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_torch_save(_state(1.0), good)
    assert checkpoint.checkpoint_problem(good) is None
    assert checkpoint.checkpoint_problem(tmp_path / "missing.ckpt") == "file not found"
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    assert "not a PyTorch checkpoint" in checkpoint.checkpoint_problem(tmp_path / "notes.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not a PyTorch checkpoint" in checkpoint.checkpoint_problem(tmp_path / "truncated.ckpt")
    atomic_torch_save({"model": {"w": torch.ones(2)}}, tmp_path / "bare.ckpt")
    assert "no state_dict" in checkpoint.checkpoint_problem(tmp_path / "bare.ckpt")
    atomic_torch_save(_state(float("nan")), tmp_path / "nan.ckpt")
    assert "non-finite weights (w)" in checkpoint.checkpoint_problem(tmp_path / "nan.ckpt")
    for name in ("notes", "truncated", "bare", "nan"):
        assert "\n" not in checkpoint.checkpoint_problem(tmp_path / f"{name}.ckpt")
