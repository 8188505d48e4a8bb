"""Checkpoint files: hashing, refusing code-running pickles, GPFM layouts, strict-key errors."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import gpfm_release

from napari_gpfm.encoders import (
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_encoder,
    sha256_file,
)
from napari_gpfm.encoders.checkpoint import convert_checkpoint


class RunsCommand:
    """Pickles as a call to os.system: loading it with plain pickle would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_sha256_streams_whole_file(tmp_path: Path):
    data = os.urandom(2 * (1 << 20) + 12345)  # crosses the 1 MiB chunk boundary
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_code_running_pickle_is_refused(tmp_path: Path, writer: str, protocol: int):
    marker = tmp_path / "marker"
    payload = {"blocks.0.attn.qkv.weight": RunsCommand(f"echo pwned > {marker}")}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path, pickle_protocol=protocol)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=protocol)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran its command"
    message = str(info.value)
    assert message.startswith(str(path))
    if protocol == 2:  # the safe loader reaches the call and names it
        assert isinstance(info.value, UnsafeCheckpointError)
        assert "refused to load" in message and "posix.system" in message
    else:  # newer protocols are rejected even earlier, at their first framing opcode
        assert "the safe loader rejected it" in message


@pytest.mark.parametrize("content", [b"", b"definitely not a checkpoint"])
def test_unreadable_file_names_the_file(tmp_path: Path, content: bytes):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(bad_st)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pth")


@pytest.mark.parametrize("global_inner_index", [True, False])
def test_gpfm_release_converts_to_flat_timm(tiny_model, global_inner_index: bool):
    flat = tiny_model.state_dict()
    converted = convert_checkpoint(gpfm_release(flat, 2, global_inner_index), "gpfm", path="g")
    assert list(converted) == list(flat)  # heads and mask_token dropped, blocks in order
    assert all(torch.equal(converted[k], flat[k]) for k in flat)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_flat_layouts_unwrap(tiny_model, wrapper: str | None):
    flat = {**tiny_model.state_dict(), "mask_token": torch.zeros(1, 48)}
    ckpt = flat if wrapper is None else {wrapper: flat, "epoch": 3}
    converted = convert_checkpoint(ckpt, "timm", path="flat")
    assert "mask_token" not in converted
    assert set(converted) == set(tiny_model.state_dict())
    ddp = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    assert set(convert_checkpoint(ddp, "timm", path="ddp")) == set(tiny_model.state_dict())


def test_key_mismatch_lists_missing_and_unexpected_keys(tiny_card, tiny_model, tmp_path: Path):
    sd = tiny_model.state_dict()
    sd = {k.replace("attn.qkv", "attn.in_proj"): v for k, v in sd.items()}  # 8 renamed keys
    del sd["norm.weight"]
    sd["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_encoder(tiny_card, weights=path)
    err = info.value
    assert set(err.missing) == {f"blocks.{i}.attn.qkv.{p}" for i in range(4)
                                for p in ("weight", "bias")} | {"norm.weight"}
    assert "extra.head.weight" in err.unexpected and len(err.unexpected) == 9
    message = str(err)
    assert message.startswith(str(path)) and "model 'tiny'" in message
    assert "missing keys (in the model, not in the file) (9): " in message
    assert "unexpected keys (in the file, not in the model) (9): " in message
    assert "blocks.0.attn.qkv.weight" in message and "extra.head.weight" in message


def test_long_key_lists_are_truncated_with_count(tiny_card, tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(50)}, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_encoder(tiny_card, weights=path)
    message = str(info.value)
    assert "(50): " in message and "... (and 30 more)" in message
    assert "layer19.weight" in message and "layer20.weight" not in message


def test_wrong_shape_fails_clearly(tiny_card, tiny_model, tmp_path: Path):
    sd = tiny_model.state_dict()
    sd["pos_embed"] = torch.zeros(1, 37, 48)  # trained at another resolution
    path = tmp_path / "wrong_shape.safetensors"
    from safetensors.torch import save_file

    save_file(sd, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_encoder(tiny_card, weights=path)
    assert info.value.wrong_shapes == ["pos_embed (file (1, 37, 48), model (1, 17, 48))"]
    assert str(path) in str(info.value) and "wrong shapes (1)" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tiny_card, tiny_model,
                                                              tmp_path: Path, bad, suffix):
    from napari_gpfm.encoders.checkpoint import NonFiniteWeightsError

    sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sd["blocks.1.mlp.fc1.weight"][0, :3] = bad
    sd["norm.bias"][0] = bad  # a second one: the message names the first in file order
    path = tmp_path / f"diverged{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_encoder(tiny_card, weights=path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "tensor 'blocks.1.mlp.fc1.weight' holds non-finite values" in message
    kind = "3 NaN, 0 inf" if bad != bad else "0 NaN, 3 inf"
    assert kind in message and "1 more tensor" in message
    assert isinstance(info.value, CheckpointError)  # the CLI's one error line, exit 2
    sd = {k: v for k, v in tiny_model.state_dict().items()}  # the same file, finite: loads
    torch.save(sd, tmp_path / "fine.pth")
    load_encoder(tiny_card, weights=tmp_path / "fine.pth")
