"""Loading CellSAM checkpoints: from a path or any fsspec URL, strictly, with a per-node cache.

The published loader uses ``strict=False``, so a wrong or truncated checkpoint silently leaves random
weights in place. Here every mismatch is a :class:`UserError` naming the keys, before any model time
is spent. Remote checkpoints are copied once per node into a local cache (atomic rename, file lock),
so many Ray actors starting together download one copy; local paths are read where they lie.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from cellsam_ray.errors import UserError, storage_errors
from cellsam_ray.model.config import CellSAMConfig, load_config
from cellsam_ray.model.network import CellSAM, build_cellsam

DEFAULT_CACHE_DIR = "~/.cache/cellsam-ray/weights"
_CHUNK = 8 << 20
_SHOWN = 5  # keys listed per kind of mismatch; the rest are counted


def load_cellsam(
    uri: str,
    config: CellSAMConfig | str = "v1.2",
    *,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    sha256: str | None = None,
    cache_dir: str | None = None,
    inference: bool = False,
) -> CellSAM:
    """A CellSAM in eval mode with the checkpoint at ``uri`` loaded strictly.

    With ``inference`` the SAM branch inference does not run is dropped before the model moves to
    ``device`` (``CellSAM.drop_unused_sam``); training and checkpoint writing need the full layout.

    The network is built on the meta device (``_fitted``, which also completes a legacy checkpoint) and
    the checkpoint tensors are assigned into it, so no random initialisation runs and no second copy of
    the weights is held.
    """
    state = load_checkpoint_state(uri, storage_options=storage_options, sha256=sha256, cache_dir=cache_dir)
    net, state, adv_mode = _fitted(state, config, uri)
    state = {key: v.float() if v.is_floating_point() else v for key, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    net.adv_mode = adv_mode
    if inference:
        net.drop_unused_sam()
    net.reset_pixel_statistics()
    return net.to(device).eval()


def load_checkpoint_state(
    uri: str, *, storage_options: dict | None = None, sha256: str | None = None, cache_dir: str | None = None
) -> dict[str, Tensor]:
    """The tensors of a checkpoint (a plain state dict or the published ``{'state_dict': ...}``).

    ``sha256`` (hex digest of the file) is verified for local files and remote downloads alike.
    Only tensors are unpickled (``weights_only=True``): a checkpoint cannot run code.
    """
    path = _local_file(uri, storage_options or {}, sha256, Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
    return _unpickled(path, uri, "cpu")


def _unpickled(source: Path | BinaryIO, uri: str, map_location: str) -> dict[str, Tensor]:
    """The state dict in ``source``, unpickled with ``weights_only=True``: an object other than tensors and
    plain containers is refused before it is built, so nothing in the file runs. On ``map_location="meta"``
    only the pickle is read, not the tensors' bytes."""
    try:
        obj = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(err)
        if "GLOBAL" in reason:  # a class or function to import and call: what runs code when unpickled
            raise UserError(f"checkpoint {uri} holds more than tensors ({reason}): it was refused and nothing in "
                            "it ran; weights must be a state dict of tensors") from None
        raise UserError(f"checkpoint {uri} is not a readable PyTorch weights file: {reason}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UserError(f"checkpoint {uri} is not a readable PyTorch weights file: {_first_line(err)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {uri} holds no state dict of tensors")
    return dict(obj)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _unpickler_reason(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely."""
    lines = (line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(err).splitlines())
    reasons = [line for line in lines
               if line and not any(word in line.lower() for word in ("weights only", "weights_only", "documentation"))]
    return reasons[0].split(" Please use")[0].rstrip(".") if reasons else _first_line(err)


# The first bytes of what torch.save writes: a zip archive (since torch 1.6), or a legacy pickle.
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def check_checkpoint_file(uri: str, config: CellSAMConfig | str, *, storage_options: dict | None = None,
                          sha256: str | None = None) -> str:
    """Check a checkpoint before any actor loads it: it exists, is readable, starts like a file torch.save
    wrote, matches ``sha256`` if given, unpickles as tensors alone (``weights_only``, on the meta device:
    only the pickle is read again, never the tensors' bytes) and fits ``config`` key for key.

    Returns the file's SHA-256, read once (on the driver, for a remote file too): a run names its weights
    by content, so a checkpoint replaced under the same URL is never taken for the one a run started with,
    and every node caches the download under that digest.
    """
    import fsspec

    readable = f"checkpoint {uri} cannot be read"
    with storage_errors(refused=readable, unreachable=readable):
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        if not fs.isfile(path):
            raise UserError(f"checkpoint {uri} not found")
        with fs.open(path, "rb") as f:
            if not f.read(4).startswith(_CHECKPOINT_MAGIC):
                raise UserError(f"checkpoint {uri} is not a PyTorch weights file (it is neither a zip archive "
                                "nor a pickle)")
            f.seek(0)
            digest = _sha256_of(f)
            if sha256:
                _verify(digest, sha256, uri)
            f.seek(0)
            state = _unpickled(f, uri, "meta")
    _fitted(state, config, uri)
    return digest


def _fitted(state: dict[str, Tensor], config: CellSAMConfig | str, uri: str) -> tuple[CellSAM, dict, bool]:
    """A CellSAM of ``config`` on the meta device, ``state`` completed to its layout, and whether the
    checkpoint has its own adversarial copy: a UserError if the keys or shapes do not fit.

    A legacy checkpoint (no ``model_cp.*`` keys) gets ``model_cp`` = ``model``, sharing tensors, and
    ``adv_mode = False``, as the published loader does."""
    config = load_config(config) if isinstance(config, str) else config
    adv_mode = any(key.startswith("model_cp.") for key in state)
    if not adv_mode:
        state = state | {"model_cp." + key.removeprefix("model."): v for key, v in state.items()
                         if key.startswith("model.")}
    with torch.device("meta"):
        net = build_cellsam(config)
    check_state(net.state_dict(), state, uri)
    return net, state, adv_mode


def check_state(expected: dict[str, Tensor], state: dict[str, Tensor], uri: str) -> None:
    """Raise a UserError listing missing keys, unexpected keys and shape mismatches, if any."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{len(items)} {kind}: {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for kind, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if items
    ]
    if problems:
        raise UserError(f"checkpoint {uri} does not fit this CellSAM config: {'; '.join(problems)}")


def _local_file(uri: str, storage_options: dict, sha256: str | None, cache_dir: Path) -> Path:
    protocol, separator, bare = uri.partition("://")  # a local path needs no fsspec (the GPU check has none)
    if not separator:
        protocol, bare = "", uri
    if protocol in ("", "file", "local"):
        path = Path(bare)
        if not path.is_file():
            raise UserError(f"checkpoint {uri} not found")
        if sha256:
            with path.open("rb") as f:
                _verify(_sha256_of(f), sha256, uri)
        return path
    return _cached_download(uri, storage_options, sha256, cache_dir)


def _cached_download(uri: str, storage_options: dict, sha256: str | None, cache_dir: Path) -> Path:
    """Copy ``uri`` into ``cache_dir`` once; named by the expected digest, else by the URI's digest.

    A file in the cache was fully written (temp file + rename) and, when named by its digest, verified;
    so a present file is used as is. Without ``sha256`` a changed remote file is not noticed: the pipeline
    always passes the digest the driver computed (``check_checkpoint_file``).
    """
    import fsspec

    name = sha256.lower() if sha256 else hashlib.sha256(uri.encode()).hexdigest()
    target = cache_dir / name
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache_dir / f"{name}.lock"):
        if target.is_file():  # another process on this node finished the download meanwhile
            return target
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f"{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, fsspec.open(uri, "rb", **storage_options) as src:
                digest = _sha256_of(src, copy_to=out)
            if sha256:
                _verify(digest, sha256, uri)
            os.replace(tmp, target)
        except FileNotFoundError:
            raise UserError(f"checkpoint {uri} not found") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _sha256_of(src: BinaryIO, copy_to: BinaryIO | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return digest.hexdigest()


def _verify(actual: str, expected: str, uri: str) -> None:
    if actual != expected.lower():
        raise UserError(f"checkpoint {uri} has sha256 {actual}, expected {expected.lower()}")


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock held across processes on this node (Ray actors are separate processes)."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
