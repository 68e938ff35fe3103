"""Exceptions raised by pathbundles. Every message names the file and the problem."""

from __future__ import annotations

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


class AnnotationError(InputError):
    """An annotation file (ASAP XML, JSON, GeoJSON, CSV) is malformed."""


class SettingError(PathBundlesError, ValueError):
    """A setting (a bundle config key, a command-line option, an argument) has a value outside its range; the
    message names the setting, the value and what is allowed."""
