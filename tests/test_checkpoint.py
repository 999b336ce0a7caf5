import json
import pickle

import pytest
import torch

from napari_genselfdiff.core import checkpoint as ck
from napari_genselfdiff.core.errors import CheckpointError
from napari_genselfdiff.core.nets.unet import UNet, UNetConfig


def _model(seed=0):
    torch.manual_seed(seed)
    return UNet(UNetConfig.from_preset("tiny", out_channels=2))


def test_roundtrip_weights_config_and_training_state(tmp_path):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(torch.randn(1, 3, 16, 16)).mean().backward()
    opt.step()
    cfg = {"kind": "segmentation", "model": m.config.to_dict(), "task": {"num_classes": 2}}
    ck.save_checkpoint(tmp_path / "c", m, cfg, {"step": 7, "optimizer": opt.state_dict(), "run": {"seed": 1}})
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        [ck.MODEL_FILE, ck.CONFIG_FILE, ck.STATE_TENSORS, ck.STATE_JSON])
    m2, cfg2 = ck.load_model(tmp_path / "c")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert cfg2["task"] == {"num_classes": 2} and cfg2["format_version"] == ck.FORMAT_VERSION
    state = ck.load_training_state(tmp_path / "c")
    assert state["step"] == 7 and state["run"] == {"seed": 1}
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer_state_from_json(state["optimizer"]))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k]))


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    ck.save_checkpoint(tmp_path / "c", m, {"model": m.config.to_dict(), "v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_json", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path / "c", _model(1), {"model": m.config.to_dict(), "v": 2})
    assert ck.load_config(tmp_path / "c")["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c"], "no temporary folder left behind"


def test_interrupted_swap_is_recovered(tmp_path):
    m = _model()
    ck.save_checkpoint(tmp_path / "c", m, {"model": m.config.to_dict()})
    (tmp_path / "c").rename(tmp_path / "c.old")  # crash between the two renames
    assert ck.load_config(tmp_path / "c")["model"] == m.config.to_dict()


def test_pickle_is_never_loaded(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / ck.CONFIG_FILE).write_text(json.dumps({"model": UNetConfig.from_preset("tiny").to_dict()}))

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (d / ck.MODEL_FILE).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="unreadable weights"):
        ck.load_model(d)


@pytest.mark.parametrize("case", ["missing", "no_config", "bad_json", "no_model_key"])
def test_bad_checkpoints_give_clear_errors(tmp_path, case):
    d = tmp_path / "c"
    if case != "missing":
        d.mkdir()
        (d / ck.MODEL_FILE).write_bytes(b"")
    if case == "bad_json":
        (d / ck.CONFIG_FILE).write_text("{not json")
    if case == "no_model_key":
        (d / ck.CONFIG_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match=str(d.name)):
        ck.load_config(d)


@pytest.mark.skipif(not hasattr(__import__("os"), "getuid"), reason="POSIX permissions")
def test_written_files_are_readable_like_ordinary_files(tmp_path):
    """Temp files/folders start private (0600/0700) and safetensors writes 0600: what we finish
    writing must get the ordinary permissions (0666/0777 less the umask), so a model or export on
    a shared drive is readable by the lab."""
    import stat

    from napari_genselfdiff.core import atomic

    file_mode, dir_mode = 0o666 & ~atomic._UMASK, 0o777 & ~atomic._UMASK
    ck.save_checkpoint(tmp_path / "c", _model(), {"kind": "segmentation", "model": _model().config.to_dict()},
                       {"step": 1})
    with atomic.atomic_directory(tmp_path / "d") as d:
        (d / "sub").mkdir()
        ck.save_checkpoint(d / "sub" / "m", _model(), {"kind": "segmentation", "model": _model().config.to_dict()})
    atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    seen = 0
    for p in [tmp_path / "x.json", *(tmp_path / "c").rglob("*"), tmp_path / "c", tmp_path / "d",
              *(tmp_path / "d").rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (dir_mode if p.is_dir() else file_mode), (p, oct(mode))
        seen += 1
    assert seen >= 10


def _saved(tmp_path):
    m = _model()
    return ck.save_checkpoint(tmp_path / "c", m, {"kind": "segmentation", "model": m.config.to_dict()}), m


def test_damaged_weights_are_refused_not_loaded(tmp_path):
    """A few flipped bytes inside the tensor data of model.safetensors used to load as NaN weights
    (zero probabilities, 0 objects, Dice 0, exit code 0): the checksum in config.json catches it."""
    d, _ = _saved(tmp_path)
    assert len(json.loads((d / ck.CONFIG_FILE).read_text())["weights_sha256"]) == 64
    ck.load_model(d)  # intact: loads
    raw = bytearray((d / ck.MODEL_FILE).read_bytes())
    raw[-64:-56] = b"\xff" * 8  # NaN bit patterns in the last tensor's data
    (d / ck.MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged weights.*checksum"):
        ck.load_model(d)


def test_non_finite_weights_are_refused_without_a_checksum(tmp_path):
    """Checkpoints written before the checksum existed are still checked for NaN/inf tensors."""
    from safetensors.torch import save_file

    d, m = _saved(tmp_path)
    cfg = json.loads((d / ck.CONFIG_FILE).read_text())
    cfg.pop("weights_sha256")
    (d / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["final_conv.weight"][0, 0] = float("nan")
    save_file(sd, str(d / ck.MODEL_FILE))
    with pytest.raises(CheckpointError, match="NaN or infinite.*final_conv.weight"):
        ck.load_model(d)


def test_config_of_another_architecture_gives_one_clear_error(tmp_path):
    d, m = _saved(tmp_path)
    cfg = json.loads((d / ck.CONFIG_FILE).read_text())
    cfg["model"]["base"] = 32  # not what the weights were trained with
    (d / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        ck.load_model(d)
    cfg["model"]["norm"] = "instance"
    (d / ck.CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no valid architecture"):
        ck.load_model(d)
