"""Crash-safe file operations: every write is to a temporary name, fsynced, renamed, and the
directory fsynced, so a power cut leaves either the old or the new content, never a mix."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# a file system without hard links (some FUSE and network mounts): the no-overwrite rename falls back to a check
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def write_file_atomically(path: Path, data: bytes, mode: int, overwrite: bool = True) -> None:
    """Put `data` at `path` whole or not at all: written to a new hidden temporary file beside it (created with
    O_EXCL and `mode`, so that a private key is 0600 before its first byte, and never through a link planted at
    that name), fsynced, then put in place in one step and the directory fsynced. `overwrite`: by os.replace (the
    old content stays until then); else by a hard link that fails with FileExistsError when `path` exists (a key
    is never replaced, not even by one made meanwhile). Ctrl-C or an error at any point leaves `path` as it was
    and removes the temporary file; a power cut may leave only that hidden `.NAME.*.tmp` file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                 mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
                os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a rename; after a link, the second name of the file


def atomic_write_bytes(path: Path, data: bytes) -> None:
    write_file_atomically(Path(path), data, 0o666)  # (the umask applies, as to any new file)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def remove_leftover_temporaries(folder: Path, names, keep=frozenset()) -> int:
    """Remove the temporary files a power cut or SIGKILL left in `folder` mid-write of one of `names`
    (write_file_atomically's `.NAME.<12 hex>.tmp`, atomic_symlink's `.NAME.tmp` link): each crash left one
    (update.json's holds the whole offer), and nothing else ever removed them. Only for a directory whose
    writers are this process (the agent holds its state dir's lock), and only the names it writes there (a
    bundle's own files in a slot, `keep`, are never touched). Returns how many were removed."""
    pattern = re.compile("|".join(rf"\.{re.escape(n)}\.[0-9a-f]{{12}}\.tmp" for n in names)) if names else None
    links = {f".{n}.tmp" for n in names}  # atomic_symlink's
    removed = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        return 0
    for name in entries:
        path = Path(folder) / name
        if path.is_symlink():
            leftover = name in links
        else:
            leftover = name not in keep and pattern is not None and pattern.fullmatch(name) and path.is_file()
        if leftover:
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def atomic_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (relative) in one rename: readers see the old or the new target."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (after an install, before the switch)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class FileKeyedCache:
    """What was read from a path, kept while the path's files stay the same: `get(path, key)` returns the value
    `put` stored under an equal key (a stat key: device, inode, size, mtime, ctime), else None; the `kept` most
    recently used paths stay. A falsy key (the files could not be read) is never stored nor matched.
    Thread-safe."""

    def __init__(self, kept: int):
        self.kept = kept
        self._entries: OrderedDict[Path, tuple[tuple, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, key: tuple | None):
        with self._lock:
            hit = self._entries.get(path)
            if hit is None or not key or hit[0] != key:
                return None
            self._entries.move_to_end(path)
            return hit[1]

    def put(self, path: Path, key: tuple | None, value) -> None:
        if not key:
            return
        with self._lock:
            self._entries[path] = (key, value)
            self._entries.move_to_end(path)
            while len(self._entries) > self.kept:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def stat_key(path: Path) -> tuple | None:
    """(device, inode, size, mtime, ctime) of `path`, None when it cannot be read: what changes when the file is
    replaced or rewritten (ctime too: `cp -p`, `rsync -a` and tar keep the mtime, no tool sets the ctime)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
