"""The registry's model files: one folder, read only, and no name that leads out of it.

A name comes from the client, so it is checked before it touches the file system
(``model_path``), in the order below, each refusal a ``ModelNameError`` naming the rule:

1. a relative POSIX path of at most ``MAX_NAME`` characters, without NUL or backslash;
2. no component that is empty, ``.``, ``..`` or hidden (``.git``, ``.cache``: never served
   and never listed);
3. resolved (symbolic links followed), it is still inside the folder: a link in the folder
   that points out of it is refused like ``../`` is. Links within the folder are followed.

Then the file must exist and be a regular file (``ModelNotFound`` otherwise). The last
component is opened with ``O_NOFOLLOW``, so a link swapped in after the check is not
followed; the folders above it are the operator's (who may write there may serve anything).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

MAX_NAME = 1024


class ModelNameError(ValueError):
    """A name that is no model's name in any registry: the client's mistake or an attack."""


class ModelNotFound(LookupError):
    """A well-formed name with no model file under it."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    size: int


def _checked_name(name: str) -> PurePosixPath:
    """Steps 1 and 2."""
    if not name or len(name) > MAX_NAME:
        raise ModelNameError(f"a model name is 1 to {MAX_NAME} characters, got {len(name)}")
    if "\x00" in name or "\\" in name:
        raise ModelNameError("a model name holds no NUL or backslash")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ModelNameError(f"model name {name[:80]!r} is absolute: names are relative")
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        raise ModelNameError(
            f"model name {name[:80]!r} has an empty, '.', '..' or hidden component"
        )
    return path


class ModelStore:
    """The model files under ``root``, a folder that must exist at start."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ValueError(f"--models {root}: not a folder")
        self.root = root.resolve()

    def model_path(self, name: str) -> Path:
        """The file the model ``name`` is (steps 1 to 3, then that it is a regular file)."""
        relative = _checked_name(name)
        try:
            path = (self.root / relative).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(f"no model {name!r}") from None
        except (OSError, RuntimeError) as exc:  # a loop of links, a name too long
            raise ModelNameError(f"model name {name[:80]!r} cannot be resolved: {exc}") from None
        if not path.is_relative_to(self.root):
            raise ModelNameError(f"model name {name[:80]!r} leads out of the models folder")
        if not path.is_file():
            raise ModelNotFound(f"no model {name!r} (not a regular file)")
        return path

    def open(self, name: str) -> BinaryIO:
        """The model opened for reading (blocking: call it off the event loop)."""
        path = self.model_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT):  # swapped since the check
                raise ModelNotFound(f"no model {name!r}") from None
            raise
        file = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            file.close()
            raise ModelNotFound(f"no model {name!r} (not a regular file)")
        return file

    def list(self) -> list[ModelFile]:
        """Every file a client may fetch, by name (blocking)."""
        found = []
        # os.walk follows no link to a folder (a loop of links cannot hold it up).
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in files:
                name = (Path(folder) / file).relative_to(self.root).as_posix()
                try:
                    resolved = self.model_path(name)
                except (ModelNameError, ModelNotFound):
                    continue  # hidden, leading out, or not a regular file
                found.append(ModelFile(name=name, size=resolved.stat().st_size))
        return sorted(found, key=lambda m: m.name)
