"""Reading a whole object (an image, a label file, a JSON document) through fsspec.

A local path must name a regular file. A FIFO, a device, a socket or a directory is refused
(``OSError`` "not a regular file (a FIFO): PATH") without a blocking open or a read: opening a
FIFO waits for a writer that may never come, and a device may never end. The check is made
on the opened file, not on its name, so nothing can be swapped in between. Other stores
(``s3://``, ...) are read as fsspec reads them, in one request where the store allows.
"""

from __future__ import annotations

import os
import stat

import fsspec
from fsspec.implementations.local import LocalFileSystem


def read_bytes(uri: str) -> bytes:
    """The whole object at ``uri`` (a local path, ``file://``, ``s3://``, ...)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return _read_regular_file(path)
    return fs.cat_file(path)


def _read_regular_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({_file_kind(mode)}): {path}")
        os.set_blocking(fd, True)
        return f.read()


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
        stat.S_ISDIR: "a directory",
    }
    return next((kind for test, kind in kinds.items() if test(mode)), "of another kind")
