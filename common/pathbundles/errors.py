"""Exceptions raised by pathbundles. Every message names the file and the problem."""

from __future__ import annotations

import os
from os import PathLike


class PathBundlesError(Exception):
    """Base class of all errors raised by pathbundles."""


class InputError(PathBundlesError, ValueError):
    """A file given to pathbundles cannot be used.

    Args:
        path: the offending file.
        problem: what is wrong, and what was expected.
        line: 1-based line number for text formats, when known.
    """

    def __init__(self, path: str | PathLike, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class SlideError(InputError):
    """A whole-slide image cannot be opened or read (corrupt, truncated, no mpp, missing level, ...)."""


class BackendRefusedError(SlideError):
    """One slide backend cannot read a file (a format it does not know, a sample layout it does not decode, its
    library missing), where another backend may: ``open_slide(backend="auto")`` then tries the next one."""


class AnnotationError(InputError):
    """An annotation file (ASAP XML, JSON, GeoJSON, CSV) is malformed."""


class FolderInUseError(InputError):
    """An output folder is locked by another run (:class:`pathbundles.outputs.FolderLock`)."""


class SlideTimeoutError(PathBundlesError):
    """A slide ran past its time budget (``slide_timeout_s`` of a cohort run). Not an ``InputError`` (a
    ``ValueError``), so that the handlers of unreadable slides do not take it for one and go on."""


class SlidesFailedError(PathBundlesError, RuntimeError):
    """Slides of a run failed, each named with its file and problem, while the others were written (the whole-slide
    writers' end of a run, :meth:`pathbundles.slide_inference.StreamedSlideWriter.ensure_completed`)."""

    @classmethod
    def listing(cls, failed: dict[str, str], written: int, unit: str = "slide") -> SlidesFailedError:
        """The error naming every failure of ``failed`` ({name: why}), saying whether the others (``written`` of
        them) were written or none was.

        Args:
            failed: {name: why} of the slides (HPFs) that failed.
            written: how many of the run's slides were written.
            unit: what failed ("slide", "HPF").
        """
        others = "the others were written" if written > 0 else f"no {unit} was written"
        listing = "; ".join(f"{name}: {why}" for name, why in failed.items())
        return cls(f"{len(failed)} {unit}(s) failed, {others}: {listing}")


class SettingError(PathBundlesError, ValueError):
    """A setting (a bundle config key, a command-line option, an argument) has a value outside its range; the
    message names the setting, the value and what is allowed."""


class OutputError(PathBundlesError, OSError):
    """A file cannot be written for lack of room (disk full, quota, file too large) or a read-only file system;
    ``errno`` is the system's, and the message starts with the file's final path (the system's own message names
    at most the temporary file, or nothing).

    Args:
        path: the file being written.
        err: the system error.
    """

    def __init__(self, path: str | PathLike, err: OSError) -> None:
        super().__init__(err.errno, err.strerror or str(err))
        self.path = str(path)

    def __str__(self) -> str:
        return f"{self.path}: cannot write the file: {self.strerror or os.strerror(self.errno or 0)}"
