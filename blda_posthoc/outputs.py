"""Writing outputs safely: safe names, exclusive claims, atomic files, resumable folders.

Every command that writes goes through this module:

- :func:`check_name`: the one rule for image names (at every store reader and writer, and for
  names found in folders): a relative ``/``-separated path, no empty, ``.`` or ``..`` part, no
  backslash, no control character.
- :func:`path_inside`: an output path under an output folder, checked (after resolving symbolic
  links) to lie inside it.
- :class:`Claim`: an exclusive, race-free claim on an output (a lock on ``OUT.lock``), taken
  before anything is created or truncated; a second run writing the same output stops at once.
- :func:`atomic_file` / :func:`write_bytes` / :func:`write_text`: a file is written under a
  fresh temporary name created with ``O_EXCL | O_NOFOLLOW`` (never through a symbolic link) and
  renamed to its final name only when complete; disk full ends in one ``error:`` naming it.
- :class:`OutputFolder`: a folder output built at ``OUT.partial`` and swapped in whole when
  complete (``--overwrite`` never leaves old and new outputs mixed); it records its settings in
  ``.blda-run.json`` and ``--resume`` continues it only when they match (:func:`check_settings`).
- :class:`ShardFolder`: the one folder that the N shards of a run (``--shard K/N``) write
  into side by side, each with its own claim and run record ``.blda-run-K-of-N.json``.
- :func:`check_not_input`: an output may not be, contain or lie inside an input.
- :func:`kept_note`: what an interrupted or failed run keeps and how to resume, attached to the
  exception so that the command line prints it (Ctrl-C exits with status 130).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from blda_posthoc.errors import InputError

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
MARKER = ".blda-run.json"
MARKER_FORMAT = "blda-run"
OLD_SUFFIX = ".blda-old"

DISK_ERRORS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file size limit reached)",
}
"""errno values that mean "no room to write", with the words used in error messages."""


# ---------------------------------------------------------------- names


def check_name(name: object, source: str | Path) -> str:
    """Return ``name`` when it is a safe image name, else raise.

    A safe name is a non-empty relative path with ``/`` separators whose parts are neither
    empty, ``.`` nor ``..``, with no backslash and no control character; such a name joined to
    an output folder stays inside it.

    Args:
        name: The name (from a store, a folder listing or an argument).
        source: Where it comes from (a file or folder), for the message.

    Returns:
        ``name``, unchanged.

    Raises:
        InputError: ``"SOURCE: image name ... is unsafe (why)"``.
    """
    why = _unsafe(name)
    if why:
        raise InputError(f"{source}: image name {name!r} is unsafe ({why})")
    assert isinstance(name, str)
    return name


def _unsafe(name: object) -> str:
    if not isinstance(name, str):
        return f"a {type(name).__name__}, not text"
    if not name:
        return "empty"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "control character"
    if "\\" in name:
        return "backslash"
    if name.startswith("/"):
        return "absolute path"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "empty, '.' or '..' part"
    return ""


def path_inside(root: Path, relative: str) -> Path:
    """``root / relative``, checked to lie inside ``root`` once symbolic links are resolved.

    Args:
        root: An output folder (it need not exist yet).
        relative: A safe name plus extension, e.g. ``city/img_000.png``.

    Returns:
        The path to write, under the resolved ``root``.

    Raises:
        InputError: When ``relative`` is unsafe or the path escapes ``root`` (through a
            symbolic link in a sub-folder or at the file itself).
    """
    check_name(relative, root)
    base = Path(root).resolve()
    target = base / relative
    if not target.resolve().is_relative_to(base):
        raise InputError(
            f"{target}: lies outside {root} through a symbolic link; refusing to write there"
        )
    return target


def check_clashes(relatives: Iterable[str], where: str | Path) -> None:
    """Refuse outputs of which one would be the folder of another (``x.png``, ``x.png/y.png``).

    Checked on every name of a run before any work, so the run does not fail half-way.

    Raises:
        InputError: ``"WHERE: outputs 'x.png' and 'x.png/y.png' clash (...)"``.
    """
    files = set(relatives)
    for relative in sorted(files):
        parts = relative.split("/")
        for end in range(1, len(parts)):
            prefix = "/".join(parts[:end])
            if prefix in files:
                raise InputError(
                    f"{where}: outputs '{prefix}' and '{relative}' clash ('{prefix}' would be "
                    "both a file and a folder); rename one of the images"
                )


def paths_inside(root: Path, relatives: Iterable[str]) -> list[Path]:
    """:func:`path_inside` for many names (sub-folders resolved once each).

    Raises:
        InputError: For the first unsafe or escaping name, two equal names, or a name that is
            the folder of another (see :func:`check_clashes`).
    """
    relatives = list(relatives)
    check_clashes(relatives, root)
    base = Path(root).resolve()
    folders: dict[str, bool] = {}
    seen: set[str] = set()
    out = []
    for relative in relatives:
        check_name(relative, root)
        if relative in seen:
            raise InputError(f"{Path(root) / relative}: two outputs of this run have this name")
        seen.add(relative)
        target = base / relative
        folder, _, _ = relative.rpartition("/")
        if folder not in folders:
            folders[folder] = target.parent.resolve().is_relative_to(base)
        escapes = not folders[folder] or (
            os.path.islink(target) and not target.resolve().is_relative_to(base)
        )
        if escapes:
            raise InputError(
                f"{target}: lies outside {root} through a symbolic link; refusing to write there"
            )
        out.append(target)
    return out


# ---------------------------------------------------------------- disk errors


def disk_error(exc: BaseException, path: str | Path) -> InputError | None:
    """An :class:`InputError` naming ``path`` when ``exc`` means "no room to write", else None."""
    code = getattr(exc, "errno", None)
    if code in DISK_ERRORS:
        return InputError(f"{path}: {DISK_ERRORS[code]}")
    text = str(exc)
    for code, words in DISK_ERRORS.items():
        if f"errno = {code}," in text or os.strerror(code) in text:
            return InputError(f"{path}: {words}")
    return None


def reserve(fd: int, offset: int, nbytes: int, path: str | Path) -> None:
    """Allocate ``nbytes`` of disk from ``offset`` in an open file before a library writes there.

    HDF5 crashes (segmentation fault) when the disk fills in the middle of its writes; reserving
    the space first turns a full disk into a clean error with nothing half written.

    Raises:
        InputError: ``"PATH: disk full"`` (or quota / file size limit).
    """
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, offset, nbytes)
    except OSError as exc:
        error = disk_error(exc, path)
        if error is not None:
            raise error from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


_ABANDONED: list[Any] = []


def abandon(handle: Any) -> None:
    """Keep a library file object whose write failed alive and untouched until the process ends.

    HDF5 can crash the process (segmentation fault) when such a file is flushed, closed or
    garbage-collected. The command line checks :func:`abandoned` and then ends the process
    without running those clean-ups.
    """
    _ABANDONED.append(handle)


def abandoned() -> bool:
    """Whether a file was abandoned (the process must end with ``os._exit``)."""
    return bool(_ABANDONED)


# ---------------------------------------------------------------- atomic files


def _open_exclusive(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(path, flags, 0o666)


NAME_MAX = 255
"""Longest file name (bytes) the usual file systems take."""


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` for writing it: ``.NAME.<random>.tmp``.

    When that would be longer than :data:`NAME_MAX` bytes (a name of 242 bytes or more),
    ``NAME`` is shortened to its start and a hash of the whole name (``.START~HASH.<random>.tmp``),
    so any name the file system takes can be written.
    """
    random = secrets.token_hex(4)
    name = path.name
    raw = os.fsencode(name)
    if len(raw) + len(f"..{random}.tmp") > NAME_MAX:
        digest = hashlib.sha256(raw).hexdigest()[:12]
        room = NAME_MAX - len(f".~{digest}.{random}.tmp")
        name = f"{os.fsdecode(raw[:room])}~{digest}"
    return path.with_name(f".{name}.{random}.tmp")


TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
"""What :func:`temporary_name` makes (left behind only by a killed run)."""


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files a killed run left anywhere under ``folder``; count them."""
    removed = 0
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            if TEMPORARY.match(filename):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(dirpath, filename))
                    removed += 1
    return removed


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Write ``path`` through an exclusive temporary file, renamed to ``path`` when complete.

    The temporary file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` under a random name,
    so an existing file or symbolic link is never followed or truncated. On any error the
    temporary file is removed and ``path`` is left as it was; a full disk becomes
    ``InputError("PATH: disk full")``.

    Args:
        path: Final path; its folder is created when missing.

    Yields:
        A binary file object to write to.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(100):
            tmp = temporary_name(path)
            try:
                fd = _open_exclusive(tmp)
                break
            except FileExistsError:
                if attempt == 99:
                    raise
    except OSError as exc:
        raise _write_error(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(exc, path) from exc
        raise


def _write_error(exc: OSError, path: Path) -> BaseException:
    error = disk_error(exc, path)
    if error is not None:
        return error
    if exc.filename is None:
        exc.filename = str(path)
    return exc


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- claims


_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    """In a forked child (e.g. a DataLoader worker): drop the parent's lock descriptors.

    ``flock`` locks belong to the open file, which a fork shares; a child that outlives a killed
    parent would otherwise keep the output locked and a prompt ``--resume`` would fail.
    """
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def lock_path(path: Path) -> Path:
    """The lock file of an output: ``OUT.lock`` beside it."""
    resolved = Path(path).resolve()
    return resolved.with_name(resolved.name + LOCK_SUFFIX)


class Claim:
    """An exclusive claim on an output path, held until :meth:`release` (or the ``with`` ends).

    The claim is an ``flock`` on ``OUT.lock``, taken before the output (or its partial
    file) is opened, created or truncated. A killed run's lock goes away with its process; the
    lock file is removed on release.

    Args:
        path: The output (file or folder) to claim.

    Raises:
        InputError: ``"OUT: another run is writing it ..."`` when it is claimed already.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = lock_path(self.path)
        self.fd: int | None = None
        self._acquire()

    def _acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            try:
                self.lock.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock, flags, 0o666)
            except OSError as exc:
                raise InputError(
                    f"{self.lock}: cannot create the lock file ({exc.strerror})"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise InputError(
                        f"{self.path}: another run is writing it now (it holds {self.lock}); "
                        "wait for it to finish"
                    ) from exc
                raise InputError(f"{self.lock}: cannot lock ({exc.strerror})") from exc
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                _HELD_FDS.add(fd)
                return
            os.close(fd)  # the holder removed the lock file meanwhile: lock the new one
        raise InputError(f"{self.lock}: cannot lock (it keeps being replaced)")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.lock)
        _HELD_FDS.discard(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- inputs vs outputs


def check_not_input(
    out: Path, inputs: Iterable[Path | None], *, folder: bool = False, option: str = "output"
) -> None:
    """Refuse an output that is one of the inputs (or, for a folder, overlaps one).

    Args:
        out: The output file or folder.
        inputs: Input files and folders (None entries are skipped).
        folder: ``out`` is a folder that will be replaced whole: it may neither contain an
            input nor lie inside an input folder.
        option: How the output is named in the message (e.g. ``--out-dir``).

    Raises:
        InputError: ``"OUT: OPTION is also an input (INPUT)"``.
    """
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        clash = target == source or _same_file(target, source)
        if folder and not clash:
            clash = target.is_relative_to(source) and source.is_dir()
            clash = clash or source.is_relative_to(target)
        if clash:
            raise InputError(f"{out}: {option} is also an input ({item}); choose another path")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------- settings


def canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as JSON gives it back (tuples become lists, keys strings)."""
    loaded: dict[str, Any] = json.loads(json.dumps(dict(settings), sort_keys=True))
    return loaded


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short, stable fingerprint of run settings (sha256 of their canonical JSON)."""
    text = json.dumps(canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_settings(
    path: Path, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> None:
    """Refuse to resume ``path`` when it was written with other settings than this run's.

    Args:
        path: The unfinished output, for the message.
        recorded: The settings it recorded, or None when it recorded none.
        current: This run's settings.

    Raises:
        InputError: Naming the first differing settings and both values.
    """
    if recorded is None:
        raise InputError(
            f"{path}: records no settings, so --resume cannot check that this run continues it "
            "(use --overwrite to start again)"
        )
    old, new = canonical(recorded), canonical(current)
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if differ:
        key = differ[0]
        more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise InputError(
            f"{path}: was written with other settings ({key}: {_short(old.get(key))} there, "
            f"{_short(new.get(key))} now{more}); cannot resume (use --overwrite to start again)"
        )


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (to recognise a model or checkpoint in run settings)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return digest.hexdigest()


# ---------------------------------------------------------------- interruption notes


def kept_note(exc: BaseException, note: str) -> None:
    """Attach what a stopped run keeps (and how to resume) to the exception being raised.

    The command line prints the notes after ``error:`` or ``interrupted``, on the same line.
    """
    if note and note not in getattr(exc, "__notes__", []):
        exc.add_note(note)


def partial_path(path: Path) -> Path:
    """Where an output is built before it is complete: ``OUT.partial``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


# ---------------------------------------------------------------- output folders


def read_record(path: Path) -> dict[str, Any] | None:
    """A run record (``.blda-run*.json``), or None when it is missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


class ClaimedOutput:
    """What every claimed output folder does on leaving its ``with`` block.

    On success :meth:`finish` (what finishing means is the subclass's), then the claim is
    released; on an exception the claim is released and the exception carries :meth:`note`
    (what was kept and how to resume).
    """

    claim: Claim

    def _check_target(
        self,
        path: Path,
        command: str,
        settings: Mapping[str, Any],
        overwrite: bool,
        resume: bool,
        inputs: Iterable[Path | None],
        option: str,
    ) -> None:
        """Check the output folder before anything is claimed.

        Sets ``path``, ``final`` (resolved), ``command`` and ``settings`` (canonical).
        """
        if overwrite and resume:
            raise InputError(f"{path}: give --overwrite or --resume, not both")
        self.path = Path(path)
        self.final = self.path.resolve()
        if self.final == self.final.parent:
            raise InputError(f"{path}: cannot write into the file-system root")
        self.command = command
        self.settings = canonical(settings)
        check_not_input(self.path, inputs, folder=True, option=option)
        if self.final.exists() and not self.final.is_dir():
            raise InputError(f"{path}: exists and is not a folder")

    def note(self) -> str:
        """What an interrupted or failed run kept, and how to continue."""
        raise NotImplementedError

    def finish(self) -> None:
        """Make the finished outputs final."""
        raise NotImplementedError

    def close(self, success: bool) -> None:
        """Finish on success and release the claim."""
        try:
            if success:
                self.finish()
        finally:
            self.claim.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            kept_note(exc, self.note())
        self.close(success=exc is None)


class OutputFolder(ClaimedOutput):
    """A folder of outputs built at ``OUT.partial`` and moved to ``OUT`` when complete.

    Use as a context manager: write every file through :meth:`file` (a path inside
    :attr:`root`), then leave the ``with`` block without error to publish the folder. On an
    error or Ctrl-C the unfinished folder stays at ``OUT.partial`` (a note says so) and
    ``--resume`` continues it when the settings match. ``.blda-run.json`` in the folder records
    the command and its settings.

    Existing outputs: without ``overwrite``/``resume`` an existing non-empty ``OUT`` or an
    unfinished ``OUT.partial`` is refused. ``overwrite`` builds a fresh folder and swaps it in
    only when complete (a non-empty ``OUT`` that no run of this tool wrote is refused rather
    than deleted). ``resume`` continues ``OUT.partial``, or a complete ``OUT`` in place.

    Args:
        path: The output folder.
        command: The command writing it (recorded).
        settings: What determines its content; ``--resume`` requires equal settings.
        overwrite: Replace an existing output.
        resume: Continue an unfinished (or complete) output written with the same settings.
        inputs: Input files and folders, which the output may not overlap.
        option: The option naming the folder, for messages.
    """

    def __init__(
        self,
        path: Path,
        *,
        command: str,
        settings: Mapping[str, Any],
        overwrite: bool = False,
        resume: bool = False,
        inputs: Iterable[Path | None] = (),
        option: str = "--out-dir",
    ) -> None:
        self._check_target(path, command, settings, overwrite, resume, inputs, option)
        self.partial = partial_path(self.final)
        self.written: set[str] = set()
        self.claim = Claim(self.final)
        self.created = False
        try:
            self.root = self._prepare(overwrite, resume)
        except BaseException:
            self.claim.release()
            raise
        self.in_place = self.root == self.final

    # -- set-up

    def _marker(self, folder: Path) -> dict[str, Any] | None:
        return read_record(folder / MARKER)

    def _write_marker(self, folder: Path, complete: bool) -> None:
        marker = {
            "format": MARKER_FORMAT,
            "version": 1,
            "command": self.command,
            "settings": self.settings,
            "complete": complete,
        }
        write_text(folder / MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")

    def _prepare(self, overwrite: bool, resume: bool) -> Path:
        self._recover()
        final_used = self.final.is_dir() and any(self.final.iterdir())
        if resume:
            for folder in (self.partial, self.final):
                if folder.is_dir() and (folder == self.partial or final_used):
                    marker = self._marker(folder)
                    check_settings(
                        folder, None if marker is None else marker.get("settings"), self.settings
                    )
                    if marker is not None and marker.get("command") != self.command:
                        raise InputError(
                            f"{folder}: was written by {marker.get('command')}, not "
                            f"{self.command}; cannot resume"
                        )
                    remove_temporaries(folder)
                    return folder
            return self._fresh()
        if not overwrite:
            if self.partial.exists():
                raise InputError(
                    f"{self.partial}: an unfinished run is there (use --resume to continue it "
                    "or --overwrite to start over)"
                )
            if final_used:
                raise InputError(
                    f"{self.path}: already exists (use --overwrite to replace it, or --resume "
                    "to complete it)"
                )
            return self._fresh()
        if final_used and self._marker(self.final) is None:
            raise InputError(
                f"{self.path}: holds files that no blda run wrote (no {MARKER}); refusing to "
                "replace it: remove it or choose another folder"
            )
        self._discard(self.partial)
        return self._fresh()

    def _recover(self) -> None:
        """Finish a swap that a killed run left half done, and drop its leftovers."""
        old = self.final.with_name(f".{self.final.name}{OLD_SUFFIX}")
        if not self.final.exists() and self.partial.is_dir():
            marker = self._marker(self.partial)
            if marker is not None and marker.get("complete"):
                os.rename(self.partial, self.final)
        if old.exists() and self._marker(old) is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _discard(self, folder: Path) -> None:
        if not folder.exists():
            return
        if not folder.is_dir() or folder.is_symlink():
            raise InputError(f"{folder}: is in the way and is not an unfinished output folder")
        if any(folder.iterdir()) and self._marker(folder) is None:
            raise InputError(
                f"{folder}: holds files that no blda run wrote; remove it or choose another folder"
            )
        shutil.rmtree(folder)

    def _fresh(self) -> Path:
        if self.partial.exists():
            self._discard(self.partial)
        try:
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise _write_error(exc, self.partial) from exc
        self._write_marker(self.partial, complete=False)
        self.created = True
        return self.partial

    def _holds_nothing(self) -> bool:
        """Whether this run created :attr:`root` and wrote no output into it yet."""
        if not self.created:
            return False
        for _, _, filenames in os.walk(self.root):
            if any(name != MARKER and not TEMPORARY.match(name) for name in filenames):
                return False
        return True

    # -- writing

    def file(self, relative: str) -> Path:
        """The path of output ``relative`` (e.g. ``city/img.png``) inside :attr:`root`.

        Raises:
            InputError: When the name is unsafe, escapes the folder, or was already given out
                in this run (two images would write the same file).
        """
        if relative in self.written:
            raise InputError(
                f"{self.path / relative}: two outputs of this run have this name; rename one"
            )
        target = path_inside(self.root, relative)
        self.written.add(relative)
        return target

    def exists(self, relative: str) -> bool:
        """Whether output ``relative`` is already in :attr:`root` (for resume)."""
        return (self.root / relative).is_file()

    # -- finishing

    def commit(self) -> None:
        """Publish the complete folder at its final path (swapping out an old one)."""
        self._write_marker(self.root, complete=True)
        if self.in_place:
            return
        old = self.final.with_name(f".{self.final.name}{OLD_SUFFIX}")
        if self.final.exists():
            if old.exists():
                shutil.rmtree(old)
            try:
                os.rename(self.final, old)  # an empty folder, or one with our marker
            except OSError as exc:
                raise _write_error(exc, self.final) from exc
        os.rename(self.partial, self.final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def close(self, success: bool) -> None:
        """Finish on success; a failed run that wrote nothing leaves no ``OUT.partial``."""
        try:
            if not success and self._holds_nothing():
                shutil.rmtree(self.root, ignore_errors=True)
        finally:
            super().close(success)

    def note(self) -> str:
        """What an interrupted run keeps, for the message (nothing when it wrote nothing)."""
        if not self.in_place and self._holds_nothing():
            return ""
        if self.in_place:
            return f"{self.path} keeps its finished outputs; rerun with --resume to complete it"
        return (
            f"the finished outputs are kept in {self.partial} ({self.path} is untouched); rerun "
            "with --resume to continue"
        )

    def finish(self) -> None:
        """Swap the finished folder in (see :meth:`commit`)."""
        self.commit()


SHARD_MARKER = re.compile(r"^\.blda-run-(\d+)-of-(\d+)\.json$")
"""The run record of one shard in a shared output folder: ``.blda-run-K-of-N.json``."""


def shard_suffix(shard: tuple[int, int]) -> str:
    """``-K-of-N``, the suffix of a shard's own files (manifest, run record, lock)."""
    return f"-{shard[0]}-of-{shard[1]}"


def check_no_unsharded_run(path: Path) -> None:
    """Refuse a shards' output folder that holds (or is building) an unsharded run's output."""
    final = Path(path).resolve()
    if partial_path(final).exists() or (final / MARKER).exists():
        raise InputError(
            f"{path}: holds the output of an unsharded run; write the shards to another folder"
        )


class ShardFolder(ClaimedOutput):
    """The output folder shared by the N shards of one run, written by shard ``(K, N)``.

    Every shard writes its own images straight into ``OUT`` (the shards' image names are
    disjoint; each PNG is written atomically), so that the N shards together leave one folder
    of outputs, as one process would. There is no ``OUT.partial`` swap: a shard is finished
    when its record ``OUT/.blda-run-K-of-N.json`` says ``"complete": true``.

    Safety, per shard: a claim on ``OUT/.shard-K-of-N`` (two runs of the same shard stop at
    once, different shards run side by side); the run record holds the settings, and
    ``--resume`` continues a shard only when they match; every shard already recorded in the
    folder must have the same command, settings and N (a folder never mixes two runs); a
    folder holding an unsharded run's output (``.blda-run.json``, or ``OUT.partial``) is
    refused. Without ``overwrite``/``resume`` a shard that already ran is refused.

    Args:
        path: The output folder.
        shard: ``(K, N)``, 1-based, with ``N > 1``.
        command: The command writing it (recorded).
        settings: What determines the content (the same for every shard).
        overwrite: Redo this shard, replacing its files.
        resume: Continue this shard, keeping its finished images.
        inputs: Input files and folders, which the output may not overlap.
        option: The option naming the folder, for messages.
    """

    def __init__(
        self,
        path: Path,
        shard: tuple[int, int],
        *,
        command: str,
        settings: Mapping[str, Any],
        overwrite: bool = False,
        resume: bool = False,
        inputs: Iterable[Path | None] = (),
        option: str = "--out-dir",
    ) -> None:
        self._check_target(path, command, settings, overwrite, resume, inputs, option)
        self.shard = shard
        check_no_unsharded_run(path)
        try:
            self.final.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(exc, self.final) from exc
        self.root = self.final
        self.record = self.final / f".blda-run{shard_suffix(shard)}.json"
        self.claim = Claim(self.final / f".shard{shard_suffix(shard)}")
        try:
            self._prepare(overwrite, resume)
        except BaseException:
            self.claim.release()
            raise

    def _check_others(self) -> None:
        """Refuse when another shard's record in the folder is of another run."""
        n = self.shard[1]
        for entry in sorted(self.final.iterdir()):
            match = SHARD_MARKER.match(entry.name)
            if match is None or entry == self.record:
                continue
            other = read_record(entry)
            j, m = int(match.group(1)), int(match.group(2))
            same = (
                other is not None
                and m == n
                and other.get("command") == self.command
                and canonical(other.get("settings") or {}) == self.settings
            )
            if not same:
                raise InputError(
                    f"{self.path}: shard {j}/{m} of another run (other command, settings or "
                    f"shard count) wrote here ({entry.name}); use another folder"
                )

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        k, n = self.shard
        self._check_others()
        if self.record.exists():
            marker = read_record(self.record)
            if resume:
                check_settings(
                    self.record, None if marker is None else marker.get("settings"), self.settings
                )
                if marker is not None and marker.get("command") != self.command:
                    raise InputError(
                        f"{self.record}: was written by {marker.get('command')}, not "
                        f"{self.command}; cannot resume"
                    )
            elif not overwrite:
                raise InputError(
                    f"{self.path}: shard {k}/{n} ran here already (use --resume to complete it "
                    "or --overwrite to redo it)"
                )
        # No sweep of temporary files here: they may belong to the other shards, running now.
        self._write_record(complete=False)
        self._check_others()  # a shard of another run that started at the same moment

    def _write_record(self, complete: bool) -> None:
        marker = {
            "format": MARKER_FORMAT,
            "version": 1,
            "command": self.command,
            "settings": self.settings,
            "shard": list(self.shard),
            "complete": complete,
        }
        write_text(self.record, json.dumps(marker, indent=2, sort_keys=True) + "\n")

    def file_name(self, name: str) -> str:
        """A per-shard file name: ``manifest.json`` gives ``manifest-K-of-N.json``."""
        stem, dot, ext = name.rpartition(".")
        return (
            f"{stem}{shard_suffix(self.shard)}{dot}{ext}"
            if dot
            else name + shard_suffix(self.shard)
        )

    def note(self) -> str:
        """What an interrupted shard keeps, for the message."""
        k, n = self.shard
        return (
            f"{self.path} keeps shard {k}/{n}'s finished outputs; rerun it with --resume to "
            "complete it"
        )

    def finish(self) -> None:
        """Record the shard as complete."""
        self._write_record(complete=True)


def output_folder(
    path: Path, shard: tuple[int, int] | None, **kwargs: Any
) -> OutputFolder | ShardFolder:
    """A :class:`ShardFolder` for shard ``(K, N)`` with ``N > 1``, else an :class:`OutputFolder`."""
    if shard is None or shard[1] == 1:
        return OutputFolder(path, **kwargs)
    return ShardFolder(path, shard, **kwargs)


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself (not a symbolic link to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
