"""Helpers that bundle configs call: where the running bundle is, the cached phantom demo data, and how a bad input
ends a bundle run."""

from __future__ import annotations

import ast
import inspect
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Demo datasets: (phantom kind, number of slides, seed) per split. Training and held-out data never share a seed.
DEMO_DATASETS: dict[tuple[str, str], tuple[int, int]] = {
    ("metastasis", "train"): (8, 0),
    ("metastasis", "val"): (2, 500),
    ("metastasis", "test"): (6, 1000),
    ("mitosis", "train"): (24, 0),
    ("mitosis", "val"): (8, 500),
    ("mitosis", "test"): (12, 1000),
    ("multiclass", "train"): (4, 0),
    ("multiclass", "val"): (2, 500),
    ("multiclass", "test"): (2, 1000),
}


def _bundle_of_config(config_file: str | os.PathLike) -> str:
    """The bundle folder of a config file: the parent of its ``configs/`` folder, else its own folder."""
    first = Path(config_file).resolve()
    return str(first.parent.parent if first.parent.name == "configs" else first.parent)


def bundle_of_config_files(files: Sequence[str | os.PathLike]) -> str:
    """The bundle folder of a ``--config_file`` list, whatever its order: that of the first file in a bundle's
    ``configs/`` folder (one holding ``metadata.json``), else of the first file in any ``configs/`` folder.

    A list may start with an override file kept elsewhere (``['site.json', 'bundles/scannet/configs/inference.json']``);
    taking the bundle from the first file made ``bundle_root`` that file's folder, where no weights are.

    Args:
        files: the config files, as given (relative to the working directory).

    Raises:
        SettingError: naming the files when none lies in a ``configs/`` folder; ``--bundle_root`` then says
            where the bundle is.
    """
    from pathbundles.errors import SettingError

    paths = [Path(str(f)).resolve() for f in files]
    in_configs = [p for p in paths if p.parent.name == "configs"]
    in_bundle = [p for p in in_configs if (p.parent / "metadata.json").is_file()]
    if not in_configs:
        raise SettingError(f"--config_file {[str(f) for f in files]}: no file lies in a bundle's configs/ folder "
                           "(beside its metadata.json), so the bundle is unknown; name a bundle config "
                           "(bundles/<name>/configs/inference.json) in the list, or pass --bundle_root")
    return str((in_bundle or in_configs)[0].parent.parent)


def config_file_list(value: str) -> list[str]:
    """The files of a ``--config_file`` value: one file, a Python list ``"['a.json', 'b.json']"`` or a comma list
    ``a.json,b.json`` (the forms MONAI's bundle commands take)."""
    try:
        files = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        files = value
    files = [str(f) for f in files] if isinstance(files, (list, tuple)) else str(files).split(",")
    return [f.strip() for f in files if f.strip()]


def root_of_running_bundle(default: str | os.PathLike = ".") -> str:
    """The bundle folder of the config being run.

    Looks at ``--config_file`` on the command line (``python -m monai.bundle run --config_file ...``: one file, a
    Python list ``"['a.json', 'b.json']"`` or a comma list ``a.json,b.json``; the bundle is that of the file in a
    bundle's ``configs/`` folder, in any position: :func:`bundle_of_config_files`), then at a MONAI
    ``ConfigWorkflow`` up the call stack (bundles run from Python), so a bundle runs from any working directory and
    from a copy anywhere (``registry export``). ``--bundle_root`` still overrides it; ``default`` is returned when
    neither is found.

    Raises:
        SettingError: when no file of ``--config_file`` lies in a ``configs/`` folder.
    """
    argv = sys.argv
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config_file=") else \
            (argv[i + 1] if arg == "--config_file" and i + 1 < len(argv) else None)
        if value is None:
            continue
        return bundle_of_config_files(config_file_list(value))
    frame = inspect.currentframe()
    while frame is not None:
        # The instance dict, not getattr: some MONAI classes raise ValueError from __getattr__.
        config_root = getattr(frame.f_locals.get("self"), "__dict__", {}).get("config_root_path")
        if isinstance(config_root, Path):
            return _bundle_of_config(config_root / "metadata.json")
        frame = frame.f_back
    return str(Path(default).resolve())


def cache_dir() -> Path:
    """Where generated demo data lives: ``$PATHBUNDLES_CACHE`` or ``~/.cache/pathbundles``."""
    return Path(os.environ.get("PATHBUNDLES_CACHE", Path.home() / ".cache" / "pathbundles"))


def demo_dataset(kind: str = "metastasis", split: str = "test") -> Path:
    """``dataset.json`` of a deterministic phantom demo dataset, generated on first use into :func:`cache_dir`.

    Generation goes to a temporary folder renamed into place at the end, so an interrupted run leaves no
    half-made dataset behind.
    """
    from pathbundles.phantom import make_phantom

    n, seed = DEMO_DATASETS[(kind, split)]
    final = cache_dir() / f"phantom-{kind}-n{n}-seed{seed}"
    if not (final / "dataset.json").exists():
        logger.info("generating the %s phantom demo data (%s split, %d images; once, a minute or two) into %s", kind,
                    split, n, final)
        tmp = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            make_phantom(tmp, kind=kind, n=n, seed=seed)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "dataset.json"


def demo_datalist(kind: str = "metastasis", split: str = "test", first: int | None = None) -> list[dict]:
    """Items of a demo dataset with absolute paths (optionally only the ``first`` ones)."""
    from pathbundles.sampling import read_datalist

    items = read_datalist(demo_dataset(kind, split))
    return items[:first] if first is not None else items


SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")
#: image files a folder of high-power fields is listed by (``kind="mitosis"``)
HPF_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
#: text manifests: one slide (or HPF image) path a line; a file without a suffix is read as one too
MANIFEST_SUFFIXES = (".txt", ".lst", ".list")


def datalist(source: str | os.PathLike | None = None, kind: str = "metastasis", split: str = "test",
             first: int | None = None, existing: bool = False) -> list[dict]:
    """The slides a bundle run works on (``--data_source``), told apart by what ``source`` is.

    Args:
        source: ``None`` for the phantom demo data; or
            - a folder of slides (every entry with a slide suffix, :data:`SLIDE_SUFFIXES`, sorted by name, hidden
              ones such as macOS ``._`` files left out), or of HPF images (:data:`HPF_SUFFIXES`) for
              ``kind="mitosis"``;
            - one slide (one HPF image for ``kind="mitosis"``), by the same suffixes;
            - a ``.json`` datalist (checked by :func:`pathbundles.sampling.read_datalist`);
            - a text manifest (:data:`MANIFEST_SUFFIXES` or no suffix, UTF-8): one path a line, relative to the
              manifest's folder (a line starting with ``http://`` or ``https://`` is a URL); blank lines and lines
              starting with ``#`` are skipped;
            - DICOM (slides only, :mod:`pathbundles.dicom_wsi`): a folder of one series' instances (``.dcm``, or
              DICOM files without a suffix) is one slide; a folder's several series, and subfolders holding a
              series each, are one slide each (beside the folder's slide files); one instance file is its
              series; a DICOMweb series URL is one slide. DICOM items are named by their series
              (:func:`pathbundles.dicom_wsi.series_name`), here and in lists that give no ``name``.
            Entries are listed as they are: one that cannot be read (a broken link, a symlink loop) fails by name
            when the run reaches it, and the others run.
        kind: which demo data when ``source`` is ``None``, and which files a folder or single file holds:
            "metastasis" or "multiclass" (slides), "mitosis" (HPF images).
        split: which split: of the demo data, or of a datalist whose items have ``split`` fields (a datalist
            without them, a folder, a slide and a manifest are used whole; see
            :func:`pathbundles.sampling.read_datalist`).
        first: how many demo items, when ``source`` is ``None``.
        existing: refuse a list (datalist or manifest) naming an image that is not a file (nor a DICOM series
            folder or a well-formed DICOMweb URL), naming the list and the entry, before anything runs (the deploy
            applications); by default such an entry fails alone in the run.

    Raises:
        InputError: naming ``source`` when it does not exist, is a folder without slides, a file of another
            extension, a manifest that is not text or lists nothing, or a malformed datalist.
    """
    from pathbundles import dicom_wsi
    from pathbundles.dicomweb import DicomWebError, is_dicomweb_url, parse_series_url, redact
    from pathbundles.errors import InputError
    from pathbundles.sampling import read_datalist

    if source is None:
        return demo_datalist(kind, split, first)
    slides_kind = kind != "mitosis"
    if slides_kind and is_dicomweb_url(str(source)):
        return [_dicom_item(str(source))]
    path = Path(source)
    suffixes, what = (HPF_SUFFIXES, "HPF image") if kind == "mitosis" else (SLIDE_SUFFIXES, "slide")
    expected = (f"expected a folder of {what}s, one {what} ({', '.join(suffixes)}), a datalist .json or a text "
                f"manifest of {what} paths ({', '.join(MANIFEST_SUFFIXES)} or no suffix, one path a line)"
                + ("; for DICOM: a folder of a series' .dcm files, one .dcm, a folder of series folders or a "
                   "DICOMweb series URL" if slides_kind else ""))
    if path.is_dir():
        try:
            slides = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))
        except OSError as err:
            raise InputError(path, f"cannot list the folder: {err}") from err
        # Not resolve(): it raises on a symlink loop, and a linked slide keeps the name it has in this folder.
        items = [{"image": os.path.abspath(p)} for p in slides]
        if slides_kind:
            items += _dicom_folder_items(path)
        if not items:
            raise InputError(path, f"no {what} files ({', '.join(suffixes)}){' or DICOM series' * slides_kind} in "
                                   "this folder")
        return items
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = read_datalist(path, split=split)
        lines: list[int | None] = [None] * len(items)
    elif not path.is_file():
        raise InputError(path, f"no such file or folder: {expected}")
    elif suffix in suffixes:
        return [{"image": os.path.abspath(path)}]
    elif slides_kind and (suffix == ".dcm" or (not suffix and dicom_wsi.is_dicom_file(path))):
        return [_dicom_item(os.path.abspath(path))]  # never read as a manifest: its bytes are no text
    elif suffix in MANIFEST_SUFFIXES or not suffix:
        lines, items = _read_manifest(path, what, expected)
    else:
        other = f"; a {suffix} is not read as {what}s by this bundle" if suffix in SLIDE_SUFFIXES + HPF_SUFFIXES \
            else ""
        raise InputError(path, f"unknown extension {suffix!r}{other}: {expected}")
    # Items of slides: every item of a slide bundle, and HPF boxes of a slide (``box``) for segmitos.
    of_slides = [slides_kind or item.get("box") is not None for item in items]
    if existing:
        for line, item, slide in zip(lines, items, of_slides):
            image = item["image"]
            if slide and is_dicomweb_url(image):
                try:
                    parse_series_url(image)
                except DicomWebError as err:
                    raise InputError(path, f"{redact(image)}: {err.problem}", line=line) from None
            elif not (Path(image).is_file() or (slide and Path(image).is_dir() and dicom_wsi.is_dicom_source(image))):
                raise InputError(path, f"{image}: no such file", line=line)
    return [_dicom_item(item["image"], item) if slide and "name" not in item and _is_dicom_image(item["image"])
            else item for item, slide in zip(items, of_slides)]


def _is_dicom_image(image: object) -> bool:
    """Whether a listed image is a DICOM slide that can be named now: a DICOMweb URL, or a DICOM file or folder
    that exists (one that does not fails by name when the run reaches it)."""
    from pathbundles.dicom_wsi import is_dicom_source
    from pathbundles.dicomweb import is_dicomweb_url

    return is_dicomweb_url(image) or (is_dicom_source(image) and Path(str(image)).exists())


def _dicom_item(image: str, item: dict | None = None) -> dict:
    """A datalist item for the DICOM slide ``image`` (a series' folder or file, or a DICOMweb URL), named by its
    series (:func:`pathbundles.dicom_wsi.series_name`: its container identifier, never an instance UID)."""
    from pathbundles.dicom_wsi import series_name

    return {**(item or {}), "image": image, "name": series_name(image)}


def _dicom_folder_items(folder: Path) -> list[dict]:
    """Items of the DICOM slides in ``folder``: the folder itself when its DICOM files are one series, one item per
    series (its first file) when they are several, and the same for each subfolder (not hidden) holding DICOM
    files; sorted by name."""
    from pathbundles import dicom_wsi

    items = []
    folders = [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for sub in folders:
        series = dicom_wsi.dicom_series(dicom_wsi.dicom_files_in(sub))
        if len(series) == 1:
            items.append(_dicom_item(os.path.abspath(sub)))
        else:
            items += [_dicom_item(os.path.abspath(files[0])) for files in series.values()]
    return sorted(items, key=lambda item: item["name"])


def _read_manifest(path: Path, what: str, expected: str) -> tuple[list[int], list[dict]]:
    """(line numbers, items) of a text manifest: one path a line, relative to its folder; InputError naming it when
    it is not UTF-8 text (a slide or other binary file under a manifest's name) or lists nothing."""
    from pathbundles.dicomweb import is_dicomweb_url
    from pathbundles.errors import InputError

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(path, f"not a text manifest: its bytes are not UTF-8 text (byte {err.start}); {expected}") \
            from None
    except OSError as err:
        raise InputError(path, f"cannot read the manifest: {err}") from err
    if "\0" in text:
        raise InputError(path, f"not a text manifest: it holds NUL bytes (a binary file); {expected}")
    lines, items = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            lines.append(number)
            # resolve() raises on a symlink loop; a URL (a DICOMweb series) stays as it is
            items.append({"image": entry if is_dicomweb_url(entry) else os.path.abspath(path.parent / entry)})
    if not items:
        raise InputError(path, f"the manifest lists no {what}s (one path a line; '#' starts a comment)")
    return lines, items


def report_outputs(writer: object) -> dict:
    """Print (and return) where a :class:`pathbundles.slide_inference.SlideMapWriter` put each slide's outputs, and
    the run's weights (``weights``: sha256, demo or not, the demo warning) when the writer knows them."""
    import json

    report = {"output_dir": str(Path(writer.output_dir).resolve()),
              **({"weights": writer.weights_record()} if writer.weights_record() else {}),
              "slide_scores": str((Path(writer.output_dir) / "slide_scores.csv").resolve()),
              "slides": {name: {"score": score, "n_detections": n,
                                **{k: str(v.resolve()) for k, v in writer.outputs(name).items()}}
                         for name, (score, n) in writer.scores.items()}}
    print(json.dumps(report, indent=2))
    return report


def model_label(metadata_file: str | os.PathLike) -> str:
    """``"<name> <version>"`` of a bundle's ``configs/metadata.json``: the model an output was made with, as
    overlays print it (not the bundle's folder name: a MONAI Deploy application's copy of the bundle lies in a
    folder of another name and must print the same).

    Raises:
        InputError: the file cannot be read as JSON or lacks a string ``name`` or ``version``.
    """
    import json

    from pathbundles.errors import InputError

    path = Path(metadata_file)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(path, f"cannot read the bundle metadata: {err}") from err
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("name", "version")):
        raise InputError(path, "expected a JSON object with string 'name' and 'version'")
    return f"{meta['name']} {meta['version']}"


def exit_on_bad_input() -> None:
    """End the process as the ``pathbundles`` command line does when a pathbundles error is not caught: one line
    ``pathbundles: error: <file>: <problem>`` on stderr and exit status 2, instead of MONAI's traceback and status 1.

    The bundles' configs call it first in their ``initialize`` list, so ``python -m monai.bundle run`` reports a
    missing or truncated datalist or checkpoint, another bundle's weights or a setting out of range in one line.
    It installs a ``sys.excepthook`` that finds the :class:`~pathbundles.errors.PathBundlesError` behind MONAI's
    wrappers (``Failed to evaluate ConfigExpression``, raised ``from`` it); any other error keeps the previous hook
    (Python's traceback, status 1), and when MONAI's wrapper ends that traceback, 40 lines below the real error, a
    last line names the real error. Raising ``SystemExit`` from the hook is what sets the status: Python exits
    with it.
    """
    from pathbundles.bundle_runner import config_error_cause

    previous = sys.excepthook
    if getattr(previous, "pathbundles_brief", False):
        return  # installed already (a second workflow in the same process)

    def hook(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
        cause = pathbundles_error_behind(exc)
        if cause is None:
            previous(exc_type, exc, tb)
            behind = config_error_cause(exc)
            if behind is not exc:
                message = " ".join(str(behind).split())
                print(f"pathbundles: error: the run failed with {type(behind).__name__}: {message} (the traceback "
                      "above shows where)", file=sys.stderr, flush=True)
            return
        message = " ".join(str(cause).split())  # one line, whatever the message holds
        print(f"pathbundles: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)

    hook.pathbundles_brief = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def pathbundles_error_behind(exc: BaseException | None) -> BaseException | None:
    """The first :class:`~pathbundles.errors.PathBundlesError` among ``exc`` and the errors it was raised from (its
    ``__cause__``, else ``__context__``), or None."""
    from pathbundles.errors import PathBundlesError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PathBundlesError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
