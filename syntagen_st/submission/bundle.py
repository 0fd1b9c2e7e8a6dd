"""A read-only view of a dataset folder or zip: file names and bytes, nothing ever written.

A zip is read in place. Before any entry is read, the whole zip is checked: an entry with
``..``, an absolute path or a drive letter, a link, a name given twice, or a total uncompressed
size above a limit (a zip bomb) makes it unsafe, and it is refused. zipfile never returns more
bytes for an entry than its header declares, so the declared total bounds what is read.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import UserError

# 10,000 pairs of a 512x512 PNG image (at most ~0.8 MB) and mask (~0.27 MB), and room to spare.
DEFAULT_MAX_BYTES = 16 * 2**30
MAX_FILE_BYTES = 64 * 2**20
"""No file of an entry is larger (a 512x512 PNG is under 1 MB): a larger one is never read into memory."""
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Problem:
    """A rule a file breaks: ``file: message``, counted by ``kind``."""

    file: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class UnsafeZip(UserError):
    """A zip refused before reading; ``problems`` names every unsafe entry."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems[:3]))
        self.problems = problems


def zip_problems(zf: zipfile.ZipFile, label: str, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Problem]:
    """Every reason not to read ``zf``: unsafe names, links, duplicates, too many entries or bytes."""
    problems = []
    seen: set[str] = set()
    infos = zf.infolist()
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
            problems.append(Problem(name, "zip safety", "absolute path in the zip (refused)"))
        elif ".." in parts:
            problems.append(Problem(name, "zip safety", "path leaves the target folder ('..') (refused)"))
        if stat.S_ISLNK(info.external_attr >> 16):
            problems.append(Problem(name, "zip safety", "a link in the zip (refused)"))
        if name in seen:
            problems.append(Problem(name, "zip safety", "the same name twice in the zip (refused)"))
        seen.add(name)
    if len(infos) > MAX_ENTRIES:
        problems.append(Problem(label, "zip safety", f"{len(infos)} entries, above the limit of {MAX_ENTRIES} (refused)"))
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        problems.append(Problem(label, "zip safety", f"expands to {total} bytes, above the limit of {max_bytes} "
                                                     "(a zip bomb?) (refused; --max-bytes raises the limit)"))
    return problems


class Bundle:
    """File names (posix, relative) and their bytes, from a folder or a zip."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path).expanduser()
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            self.names = self._folder_names()
        elif self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{self.path}: neither a folder nor a readable zip ({err})") from None
            problems = zip_problems(self._zip, str(self.path), max_bytes)
            if problems:
                self._zip.close()
                raise UnsafeZip(problems)
            self.names = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
        else:
            raise UserError(f"{self.path}: no such folder or zip")

    def _folder_names(self) -> list[str]:
        names = []
        for folder, dirs, files in os.walk(self.path):  # links to folders are not followed
            for name in files:
                names.append(Path(folder, name).relative_to(self.path).as_posix())
        return sorted(names)

    def is_link(self, name: str) -> bool:
        return self._zip is None and (self.path / name).is_symlink()

    def size(self, name: str) -> int:
        """The file's size in bytes: its declared size in a zip (zipfile never returns more)."""
        if self._zip is not None:
            return self._zip.getinfo(name).file_size
        return (self.path / name).stat().st_size

    def read(self, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
        """The file's bytes; a UserError, before anything is read, when it is larger than ``max_bytes``
        (a zip entry of 1 GiB of zeros compresses to 1 MB)."""
        size = self.size(name)
        if size > max_bytes:
            raise UserError(f"{name}: {size:,} bytes, above the limit of {max_bytes:,} for one file of an entry")
        if self._zip is not None:
            return self._zip.read(name)
        path = self.path / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.path.resolve()):
            raise UserError(f"{name}: a link to a file outside {self.path}")
        return path.read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_root(names: list[str], marker_dirs: tuple[str, ...] = ("image/", "mask/")) -> str:
    """The prefix under which an entry sits: '' or one top folder (a zip of 'submission/...')."""
    if any(n.startswith(marker_dirs) or n == "train.txt" for n in names):
        return ""
    tops = {PurePosixPath(n).parts[0] for n in names if "/" in n}
    if len(tops) == 1:
        top = tops.pop() + "/"
        if any(n[len(top):].startswith(marker_dirs) for n in names if n.startswith(top)):
            return top
    return ""
