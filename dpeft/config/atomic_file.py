"""Publishing a file atomically: written whole under a temporary name next to it, then renamed over it.

Shared by every writer of checkpoint files (the adapter config here, safetensors files in `dpeft.store`): readers
see the previous file or the complete new one, never a partial write.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable


def publish_atomically(path: str | os.PathLike, write: Callable[[int], object]) -> None:
    """Run `write(fd)` on a fresh temporary file next to `path`, then rename it to `path`; on failure, remove it.

    Readers of `path` see the previous file or the complete new one, never a partial write. (Like safetensors and
    PEFT, nothing is fsynced: this guards against crashes and errors of the writing process.)
    """
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    # Unique per writer, so concurrent saves into one directory never share a temporary file; mode 0o666 lets the
    # umask decide the published file's permissions, as for any file the user creates.
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)  # O_BINARY: no newline translation on Windows
    try:
        try:
            write(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
