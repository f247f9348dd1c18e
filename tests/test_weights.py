"""Checkpoint loading: strict keys, published layouts, legacy checkpoints, digests, URLs and the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
import pytest
import torch

from cellsam_ray.errors import UserError
from cellsam_ray.model.config import CellSAMConfig
from cellsam_ray.model.weights import load_cellsam, load_checkpoint_state
from cellsam_ray.testing.checks import reference_dir

GOLDEN = reference_dir() / "golden"
CHECKPOINT = GOLDEN / "tiny_cellsam.pt"
CONFIG = str(GOLDEN / "tiny_config.json")


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return torch.load(CHECKPOINT, map_location="cpu", weights_only=True)


def save(tmp_path: Path, obj, name: str = "ckpt.pt") -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def assert_holds(net, state: dict[str, torch.Tensor]) -> None:
    loaded = net.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_tiny_checkpoint_loads_strictly_and_completely(tiny_state):
    net = load_cellsam(str(CHECKPOINT), CONFIG)
    assert net.adv_mode and net.sam is net.model_cp and not net.training
    assert_holds(net, tiny_state)
    tensors = [*net.parameters(), *net.buffers()]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert net.model_cp.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    assert net.model_cp.pixel_std.flatten().tolist() == pytest.approx([58.395, 57.12, 57.375])


def test_published_wrapped_layout_loads_with_weights_only(tmp_path, tiny_state):
    net = load_cellsam(save(tmp_path, {"state_dict": tiny_state}), CellSAMConfig.from_json(CONFIG))
    assert_holds(net, tiny_state)


def test_legacy_checkpoint_copies_model_into_model_cp(tmp_path, tiny_state):
    legacy = {k: v for k, v in tiny_state.items() if not k.startswith("model_cp.")}
    net = load_cellsam(save(tmp_path, legacy), CONFIG)
    assert not net.adv_mode and net.sam is net.model
    for key, value in legacy.items():
        if key.startswith("model."):
            assert torch.equal(net.state_dict()["model_cp." + key[len("model."):]], value), key


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["cellfinder.decode_head.transformer.pattern.weight"]
    state["cellfinder.decode_head.transformer.level_embed.weight"] = torch.zeros(3, 256)
    state["model_cp.image_encoder.pos_embed"] = torch.zeros(1, 32, 32, 64)
    with pytest.raises(UserError) as err:
        load_cellsam(save(tmp_path, state), CONFIG)
    message = str(err.value)
    assert "1 missing keys: cellfinder.decode_head.transformer.pattern.weight" in message
    assert "1 unexpected keys: cellfinder.decode_head.transformer.level_embed.weight" in message
    assert "1 shape mismatches: model_cp.image_encoder.pos_embed (1, 32, 32, 64) != (1, 64, 64, 64)" in message
    assert "\n" not in message


def test_many_missing_keys_are_counted_not_all_listed():
    # The tiny model into the v1.2 sizes: v1.2's extra blocks are missing, shared keys differ in shape.
    with pytest.raises(UserError, match=r"610 missing keys: (model\.[^,;]+, ){5}\.\.\.; 369 shape mismatches: "):
        load_cellsam(str(CHECKPOINT), "v1.2")


def test_sha256_is_verified(tiny_state):
    digest = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    assert load_checkpoint_state(str(CHECKPOINT), sha256=digest.upper()).keys() == tiny_state.keys()
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint_state(str(CHECKPOINT), sha256="0" * 64)


def test_remote_url_is_downloaded_once_into_the_cache(tmp_path, tiny_state):
    uri = "memory://cellsam-test/tiny.pt"
    fs = fsspec.filesystem("memory")
    fs.pipe(uri, CHECKPOINT.read_bytes())
    try:
        first = load_checkpoint_state(uri, cache_dir=str(tmp_path))
        cached = tmp_path / hashlib.sha256(uri.encode()).hexdigest()
        assert cached.read_bytes() == CHECKPOINT.read_bytes()
        fs.rm(uri)  # a second load can only succeed from the cache
        second = load_cellsam(uri, CONFIG, cache_dir=str(tmp_path))
    finally:
        if fs.exists(uri):
            fs.rm(uri)
    assert first.keys() == tiny_state.keys()
    assert_holds(second, tiny_state)
    assert not list(tmp_path.glob("*.part"))


def test_remote_sha256_names_the_cache_entry_and_a_mismatch_leaves_nothing(tmp_path):
    uri = "memory://cellsam-test/pinned.pt"
    fs = fsspec.filesystem("memory")
    fs.pipe(uri, CHECKPOINT.read_bytes())
    digest = hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()
    try:
        with pytest.raises(UserError, match="sha256"):
            load_checkpoint_state(uri, sha256="f" * 64, cache_dir=str(tmp_path))
        assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
        load_checkpoint_state(uri, sha256=digest, cache_dir=str(tmp_path))
    finally:
        fs.rm(uri)
    assert (tmp_path / digest).is_file()


def test_unreadable_inputs_are_one_line_user_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    cases = {
        str(text): "not a readable PyTorch weights file",
        str(tmp_path / "absent.pt"): "not found",
        "memory://cellsam-test/absent.pt": "not found",
        save(tmp_path, [torch.zeros(1)], "list.pt"): "no state dict of tensors",
        save(tmp_path, {"x": torch.zeros(1), "n": 3}, "mixed.pt"): "no state dict of tensors",
    }
    for uri, reason in cases.items():
        with pytest.raises(UserError, match=reason) as err:
            load_checkpoint_state(uri, cache_dir=str(tmp_path / "cache"))
        assert "\n" not in str(err.value)


class _Payload:
    """An arbitrary object: unpickling it would mean a checkpoint could run code."""


def test_pickled_objects_are_refused(tmp_path):
    path = save(tmp_path, {"x": _Payload()})
    with pytest.raises(UserError, match=f"checkpoint {path} holds more than tensors .*_Payload") as err:
        load_checkpoint_state(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
