"""Where zarr data lives: a local path or any fsspec URL (s3://, gs://, memory://, file://).

Everything else in the package opens stores through here, so that storage options, read-only mode and the
errors a user can act on (a missing bucket, refused credentials, an unreachable endpoint, a path that is not
there) are handled once. Local paths use zarr's ``LocalStore`` (no fsspec layer); URLs use
``FsspecStore.from_url`` with the storage options passed explicitly, never dropped: a library that drops
them sends a bare ``s3://`` URL to real AWS (stack.md 3.4).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import fsspec
import zarr
import zarr.errors
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from cellsam_ray.errors import UserError, storage_errors

Mode = Literal["r", "r+", "a", "w", "w-"]

# Filesystems whose first path component is a bucket/container that must exist before anything is written.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


# Storage option names that hold credentials (s3fs, gcsfs, adlfs, and botocore's client_kwargs).
SECRET_OPTIONS = frozenset({
    "key", "secret", "token", "password", "access_key", "secret_key", "session_token", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "account_key", "sas_token", "client_secret",
    "connection_string", "credentials",
})


def inline_secret(options: Any, where: str = "storage_options") -> str | None:
    """The dotted name of the first credential written into ``options`` (however deeply nested), or None."""
    if not isinstance(options, dict):
        return None
    for name, value in options.items():
        if str(name).lower() in SECRET_OPTIONS and value not in (None, ""):
            return f"{where}.{name}"
        found = inline_secret(value, f"{where}.{name}")
        if found:
            return found
    return None


HOW_TO_PASS_SECRETS = ("name the environment variable that holds it instead (storage_options_env, e.g. "
                       '{"secret": "AWS_SECRET_ACCESS_KEY"}), or use a profile (storage_profile) or the '
                       "machine's own credentials (environment, instance role)")


def parse_storage_options(text: str | None, flag: str = "--storage-options", *,
                          names_only: bool = False) -> dict[str, Any] | None:
    """The JSON object given to ``flag`` (``--storage-options`` or the like), or None when not given.

    A credential in it is refused (a command line is kept in shell histories and shown by ``ps``), unless
    it maps options to the *names* of environment variables (``names_only``: ``--storage-options-env``)."""
    if text is None or not text.strip():
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} is not valid JSON: {err}") from None
    if not isinstance(options, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(options).__name__}")
    secret = None if names_only else inline_secret(options, flag)
    if secret:
        raise UserError(f"{secret} holds a secret, which a command line must not: {HOW_TO_PASS_SECRETS}")
    return options


@dataclass(frozen=True, eq=False)
class StorageAccess:
    """How a run reaches its storage, with no secret in it: plain fsspec options, the names of environment
    variables that hold more options (credentials), and an AWS profile.

    It travels to every Ray process (inside plans and task or actor arguments, hence into the object store,
    spill files and the dashboard); each process resolves it with ``options()`` from its own environment,
    as the driver does, so a credential is never pickled.
    """

    plain: dict[str, Any] | None = None
    env: dict[str, str] | None = None
    profile: str | None = None

    def options(self) -> dict[str, Any] | None:
        """The fsspec storage options here, in this process; UserError for a variable that is not set."""
        options = dict(self.plain or {})
        for option, variable in (self.env or {}).items():
            if variable not in os.environ:
                raise UserError(f"storage_options_env.{option} names the environment variable {variable}, "
                                "which is not set here")
            options[option] = os.environ[variable]
        if self.profile:
            options["profile"] = self.profile
        return options or None


def is_local(url: str) -> bool:
    """True for a plain path or a file:// URL (a one-letter scheme is a Windows drive, also local)."""
    scheme = urlsplit(str(url)).scheme
    return scheme in ("", "file") or len(scheme) == 1


def local_path(url: str) -> Path:
    """The filesystem path of a local location (plain path or file:// URL)."""
    url = str(url)
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def read_text(url: str, storage_options: dict | None = None, *, what: str, expected: str) -> str:
    """The text of the file at ``url`` (a path or fsspec URL), or a one-line UserError naming it as ``what``
    (a job spec, a manifest) and saying what it should have been (``expected``) when it is a folder."""
    try:
        if is_local(url):
            return local_path(url).read_text()
        with fsspec.open(url, "rt", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {url} not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {url} is a folder, not {expected}") from None
    except Exception as err:  # noqa: BLE001 - permissions, network, credentials: all the user's to fix
        raise UserError(f"cannot read {what} {url}: {type(err).__name__}: {err}") from None


def join_url(url: str, *parts: str) -> str:
    """``url`` with path components appended, for local paths and URLs alike."""
    if is_local(url) and not str(url).startswith("file://"):
        return str(Path(url).joinpath(*parts))
    return posixpath.join(str(url).rstrip("/"), *parts)


def relative_url(url: str, relative: str) -> str:
    """Where the relative path ``relative`` (e.g. ``../..``) leads from ``url``, for local paths and URLs alike."""
    if is_local(url) and not str(url).startswith("file://"):
        return os.path.normpath(os.path.join(str(url), relative))
    scheme, _, path = str(url).partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, relative))}"


def open_for_writing(url: str, storage_options: dict[str, Any] | None = None):
    """A new binary file at ``url`` (its folder made where the filesystem has folders), to stream into."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, "wb")


def open_store(url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = True) -> Store:
    """A zarr store rooted at ``url``; nothing is read or written yet."""
    if is_local(url):
        if storage_options:
            raise UserError("--storage-options only applies to remote URLs (s3://, gs://, ...), not local paths")
        return LocalStore(local_path(url), read_only=read_only)
    try:
        return FsspecStore.from_url(str(url), storage_options=dict(storage_options or {}), read_only=read_only)
    except (ImportError, ValueError) as err:
        raise UserError(f"cannot open {url}: {err}") from None


def open_group(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    mode: Mode = "r",
    zarr_format: Literal[2, 3] | None = None,
) -> zarr.Group:
    """Open (``r``, ``r+``, ``a``) or create (``w``, ``w-``, ``a``) the zarr group at ``url``.

    Raises UserError for a location that does not exist (when reading), a bucket that does not exist,
    refused credentials or an unreachable endpoint. ``mode="w"`` replaces whatever is there.
    """
    check_location(url, storage_options, must_exist=mode in ("r", "r+"))
    store = open_store(url, storage_options, read_only=mode == "r")
    try:
        return zarr.open_group(store, mode=mode, zarr_format=zarr_format)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError):
        raise UserError(f"no zarr group at {url}") from None
    except zarr.errors.ContainsArrayError:
        raise UserError(f"{url} is a zarr array, not a group") from None
    except zarr.errors.ContainsGroupError:
        raise UserError(f"{url} already exists") from None
    except PermissionError as err:
        raise UserError(f"access to {url} was refused ({err}): check the credentials") from None


def check_location(url: str, storage_options: dict[str, Any] | None = None, *, must_exist: bool) -> None:
    """Fail early, with a message a user can act on, when ``url`` cannot be used.

    For object stores the bucket must exist even when writing (zarr would otherwise fail on the first
    chunk with a bare FileNotFoundError). Any failure to even ask the storage (bad endpoint, DNS, TLS,
    refused credentials) is reported as a UserError naming the URL.
    """
    if is_local(url):
        path = local_path(url)
        if must_exist and not path.exists():
            raise UserError(f"{url} does not exist")
        if path.exists() and not path.is_dir():
            raise UserError(f"{url} is a file, not a zarr directory")
        return
    try:
        # A fresh instance: a cached one may answer from a listing made before the bucket was created.
        fs, path = fsspec.url_to_fs(str(url), skip_instance_cache=True, **dict(storage_options or {}))
    except (ImportError, ValueError, TypeError) as err:
        raise UserError(f"cannot open {url}: {err}") from None
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    with storage_errors(refused=f"access to {url} was refused", unreachable=f"cannot reach {url}"):
        if protocols & _BUCKET_PROTOCOLS:
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)  # unlike exists(), raises when the endpoint cannot be reached
            except FileNotFoundError:
                raise UserError(
                    f"bucket {bucket!r} of {url} does not exist (or these credentials cannot see it)"
                ) from None
        if must_exist and not fs.exists(path):
            raise UserError(f"{url} does not exist")
