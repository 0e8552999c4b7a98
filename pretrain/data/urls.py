"""Where shards live and how their bytes are read: local paths, http(s):// (through curl), ``pipe:<command>``
(webdataset's convention: the command's standard output is the shard) and any fsspec protocol (s3://, gs://,
memory://...).

HTTP goes through curl rather than an in-process client: curl's timeouts (``--connect-timeout``, and
``--speed-limit 1 --speed-time`` for a connection that stalls) and exit codes are precise, and a stuck transfer is a
process that can be killed. Patterns (braces, globs, comma lists, folders) expand the same way for every kind.
"""

from __future__ import annotations

import glob
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from braceexpand import UnbalancedBracesError, braceexpand

from .config import DataError

__all__ = [
    "ReadOptions",
    "ShardStream",
    "expand_shards",
    "filesystem",
    "open_shard",
    "probe_shard",
    "read_beside",
    "url_kind",
]

# fsspec protocols whose implementation is an optional package, and the extra of this project that installs it.
_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_CURL_MEANING = {
    6: "host not found",
    7: "connection refused or host unreachable",
    18: "connection dropped mid-transfer",
    22: "HTTP error",
    28: "timed out",
    35: "TLS handshake failed",
    52: "empty reply",
    56: "connection broken while receiving",
}


@dataclass(frozen=True)
class ReadOptions:
    """How remote shards are read (the ``data.retries``, ``retry_backoff``, timeouts and storage options)."""

    retries: int = 3
    retry_backoff: float = 1.0
    connect_timeout: float = 30.0
    read_timeout: float = 60.0
    storage_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: Any) -> ReadOptions:
        """The reading options of a data config section."""
        return cls(
            cfg.retries, cfg.retry_backoff, cfg.connect_timeout, cfg.read_timeout, dict(cfg.storage_options or {})
        )


def url_kind(location: str) -> str:
    """``"local"``, ``"http"`` (http:// and https://), ``"pipe"`` (``pipe:<command>``) or ``"fsspec"`` (any other
    ``protocol://``; ``file://`` included)."""
    if location.startswith("pipe:"):
        return "pipe"
    scheme, sep, _ = location.partition("://")
    if not sep or not scheme.replace("+", "").replace("-", "").isalnum():
        return "local"
    return "http" if scheme.lower() in ("http", "https") else "fsspec"


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The fsspec filesystem of ``url``'s protocol.

    Raises:
        DataError: fsspec does not know the protocol, or its optional package is not installed (naming the extra).
    """
    import fsspec

    protocol = url.partition("://")[0].lower() if "://" in url else "file"
    try:
        return fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError as exc:
        package, extra = _EXTRAS.get(protocol, (None, None))
        hint = f"pip install 'swinv2-pretrain[{extra}]' (installs {package})" if extra else f"install it ({exc})"
        raise DataError(f"{url!r}: the {protocol}:// protocol needs a package that is missing; {hint}") from None
    except ValueError as exc:
        raise DataError(f"{url!r}: unknown protocol {protocol!r} ({exc})") from None


# ------------------------------------------------------------------------------------------------- patterns
def _brace_error(pattern: str, detail: str) -> DataError:
    return DataError(
        f"data.path={pattern!r} has unbalanced braces ({detail}); accepted: a brace pattern like "
        f"shard-{{000000..000127}}.tar or x-{{a,b}}.tar, a glob, a comma-separated list of those, or a shard folder"
    )


def _split_top_level(pattern: str) -> list[str]:
    """Split ``pattern`` on the commas outside braces (inside they are brace alternatives); ``\\`` escapes.

    Raises:
        DataError: on unbalanced braces, naming the position.
    """
    parts: list[str] = []
    current: list[str] = []
    depth, escaped = 0, False
    for position, char in enumerate(pattern):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                raise _brace_error(pattern, f"'}}' at position {position} closes no '{{'")
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise _brace_error(pattern, f"{depth} '{{' left open")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _expand_item(item: str, storage_options: dict[str, Any] | None) -> list[str]:
    """One expanded entry: a folder -> its ``*.tar``; a glob -> its matches (sorted); else the entry itself."""
    kind = url_kind(item)
    if kind == "local":
        if Path(item).is_dir():
            return sorted(str(p) for p in Path(item).glob("*.tar"))
        return sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
    if kind != "fsspec":
        return [item]  # http and pipe: no listing
    fs = filesystem(item, storage_options)
    if any(c in item for c in "*?["):
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(item))
    if item.endswith("/") or fs.isdir(item):
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(item.rstrip("/") + "/*.tar"))
    return [item]


def expand_shards(pattern: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard locations from a brace pattern (``train-{000000..000127}.tar``), glob, comma-separated list or a folder.

    A folder (local or fsspec) stands for every ``*.tar`` directly inside it. The list is split on commas outside
    braces only, so brace alternatives (``x-{a,b}.tar``) and lists combine. URLs (http(s)://, s3://..., pipe:) expand
    their braces the same way; fsspec URLs also their globs.

    Raises:
        DataError: the pattern is malformed (unbalanced braces), or its protocol is unusable.
    """
    if pattern and url_kind(pattern) == "local" and Path(pattern).is_dir():
        return _expand_item(pattern, storage_options)
    urls: list[str] = []
    for part in _split_top_level(pattern):
        try:
            items = list(braceexpand(part))
        except UnbalancedBracesError as exc:  # what the splitter's own check lets through (e.g. escapes)
            raise _brace_error(pattern, str(exc)) from None
        for item in items:
            urls.extend(_expand_item(item, storage_options))
    return urls


# ---------------------------------------------------------------------------------------------------- reading
class ShardStream:
    """The open bytes of one shard (``.file``); :meth:`close` says whether the transfer itself failed.

    Args:
        url: the shard's location.
        options: timeouts and storage options.
    """

    def __init__(self, url: str, options: ReadOptions) -> None:
        self.url, self.kind, self.options = url, url_kind(url), options
        self.process: subprocess.Popen | None = None
        self.file: IO[bytes]
        if self.kind == "local":
            self.file = open(url, "rb")  # noqa: SIM115 - closed in close()
        elif self.kind == "fsspec":
            self.file = filesystem(url, options.storage_options).open(url, "rb")
        else:
            command: str | list[str] = url[len("pipe:") :] if self.kind == "pipe" else _curl(url, options)
            self.process = subprocess.Popen(
                command, shell=self.kind == "pipe", stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1 << 20
            )
            self.file = self.process.stdout  # type: ignore[assignment]

    def close(self, drain: bool = True) -> str | None:
        """Close the stream; the failure of the transfer (curl's or the command's exit status), or None.

        Args:
            drain: read what is left (up to 1 MiB: the archive's padding, or nothing after a broken transfer) so that
                the process's exit status is known. With more left, or without ``drain``, the process is stopped and
                its status not judged.
        """
        if self.process is None:
            self.file.close()
            return None
        process = self.process
        judged = drain and len(process.stdout.read(1 << 20)) < 1 << 20  # type: ignore[union-attr]
        if not judged:
            process.kill()
        process.stdout.close()  # type: ignore[union-attr]
        returncode = process.wait()
        stderr = process.stderr.read().decode(errors="replace").strip()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
        if not judged or returncode == 0:
            return None
        return self.describe(returncode, stderr)

    def describe(self, returncode: int, stderr: str) -> str:
        """What an exit status of the transfer process means."""
        if self.kind == "pipe":
            detail = stderr.splitlines()[-1] if stderr else ""
            return f"command exit status {returncode}" + (f" ({detail})" if detail else "")
        return self.describe_curl(returncode, stderr, self.options)

    @staticmethod
    def describe_curl(returncode: int, stderr: str, options: ReadOptions) -> str:
        """What a curl exit status means (with curl's own message)."""
        if returncode == 28 and "too slow" in stderr:  # --speed-limit/--speed-time: the connection stalled
            return f"curl exit 28: no data for data.read_timeout={_seconds(options.read_timeout)} s"
        detail = stderr.splitlines()[-1] if stderr else ""
        meaning = _CURL_MEANING.get(returncode, "transfer failed")
        return f"curl exit {returncode}: {meaning}" + (f" ({detail})" if detail else "")


def _seconds(value: float) -> str:
    return f"{value:g}"


def _curl(url: str, options: ReadOptions) -> list[str]:
    return [
        "curl",
        "--fail",
        "--silent",
        "--show-error",
        "--location",
        "--connect-timeout",
        _seconds(options.connect_timeout),
        # Less than 1 byte/s for read_timeout seconds: the connection stalled.
        "--speed-limit",
        "1",
        "--speed-time",
        str(max(1, round(options.read_timeout))),
        url,
    ]


def open_shard(url: str, options: ReadOptions) -> ShardStream:
    """Open one shard for reading (raises OSError or DataError when it cannot even be opened)."""
    return ShardStream(url, options)


def _head(url: str, options: ReadOptions) -> str | None:
    """The failure of an HTTP HEAD request of ``url`` (None: reachable); servers that refuse HEAD (403, 405: e.g.
    URLs signed for GET) are given the benefit of the doubt here and judged by the first read."""
    command = _curl(url, options)
    command.insert(1, "--head")
    run = subprocess.run(command, capture_output=True, timeout=options.connect_timeout + options.read_timeout + 5)
    stderr = run.stderr.decode(errors="replace").strip()
    if run.returncode == 0 or (run.returncode == 22 and any(f" {code}" in stderr for code in ("403", "405"))):
        return None
    return ShardStream.describe_curl(run.returncode, stderr, options)


def probe_shard(url: str, options: ReadOptions) -> None:
    """Check that ``url`` can be read (HTTP: a HEAD request; pipe: and fsspec: its first tar header): a wrong URL,
    host or command fails here, before training.

    Raises:
        DataError: naming the URL and the cause.
    """
    kind = url_kind(url)
    if kind == "http":
        failure = _head(url, options)
        if failure is not None:
            raise DataError(f"shard {url} cannot be reached ({failure})")
        return
    try:
        stream = open_shard(url, options)
        head = stream.file.read(512)
    except (OSError, DataError) as exc:
        raise DataError(f"shard {url} cannot be read: {exc}") from None
    failure = stream.close(drain=len(head) < 512)
    if failure is None and len(head) < 512:
        failure = f"{len(head)} bytes, less than one tar header"
    if failure is not None:
        raise DataError(f"shard {url} cannot be read: {failure}")


def read_beside(url: str, name: str, options: ReadOptions) -> bytes | None:
    """The file ``name`` in the folder of shard ``url`` (a size or class index), or None when there is none.

    Raises:
        DataError: the folder is reachable but the file cannot be read for another reason than its absence.
    """
    kind = url_kind(url)
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    location = f"{folder}/{name}"
    if kind == "local":
        path = Path(location)
        return path.read_bytes() if path.is_file() else None
    if kind == "fsspec":
        fs = filesystem(url, options.storage_options)
        return fs.cat_file(location) if fs.isfile(location) else None
    if kind == "http":
        run = subprocess.run(_curl(location, options), capture_output=True, timeout=options.connect_timeout + 60)
        if run.returncode == 0:
            return run.stdout
        if run.returncode == 22 and b" 404" in run.stderr:
            return None
        raise DataError(f"{location} cannot be read (curl exit {run.returncode}: {run.stderr.decode().strip()})")
    return None  # pipe: no folder
