"""The ``pathbundles`` command line (python-fire). Each verb prints JSON and imports its module on demand.

``--help`` is answered here, from the source text of the verbs (:func:`help_text`), without importing fire, MONAI or
MLflow: help is instant and complete (the verbs of ``registry`` and ``deploy`` included), on stdout, exit status 0.
"""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path
from typing import Any


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2, default=str))


def info(slide: str, backend: str = "auto", slide_mpp: float | None = None) -> None:
    """Print a slide's backend, vendor, levels (sizes, downsamples, um/px) and level-0 mpp as JSON; ``slide_mpp``
    (level-0 um/px) overrides a missing or wrong value in the file, as the bundles' key of that name does."""
    from pathbundles.wsi import slide_info

    _print_json(slide_info(slide, backend=backend, mpp=slide_mpp))


def tissue(slide: str, out: str, mpp: float = 8.0, backend: str = "auto", slide_mpp: float | None = None) -> None:
    """Write the Otsu tissue mask of SLIDE as a PNG (white = tissue) at about ``mpp`` um/px; ``slide_mpp`` is the
    slide's level-0 um/px when its file states none or a wrong one."""
    from pathbundles.tissue import tissue_mask
    from pathbundles.wsi import open_slide

    with open_slide(slide, backend=backend, mpp=slide_mpp) as opened:
        mask = tissue_mask(opened, mpp=mpp)
    mask.save_png(out)
    _print_json({"out": str(Path(out).resolve()), "mpp": mask.mpp, "shape_hw": list(mask.mask.shape),
                 "tissue_fraction": float(mask.mask.mean())})


def phantom(outdir: str, kind: str = "metastasis", n: int = 4, seed: int = 0, mpp: float | None = None,
            downsample_step: int | None = None) -> None:
    """Generate a deterministic phantom dataset (kind: metastasis | mitosis | multiclass | geometry) into OUTDIR;
    --mpp (level-0 um/px, e.g. 0.2265) and --downsample_step (pyramid step, 2 or 4; not for mitosis HPFs) override
    the kind's defaults."""
    from pathbundles.phantom import make_phantom

    options = {k: v for k, v in (("mpp", mpp), ("downsample_step", downsample_step)) if v is not None}
    _print_json({"dataset": str(make_phantom(outdir, kind=kind, n=n, seed=seed, **options))})


def froc(masks: str, detections: str, out: str, level0_mpp: float = 0.243, mask_downsample: float = 32,
         exclude_slides: str = "Test_049,Test_114") -> None:
    """Camelyon16 FROC from tumour masks (DIR/<slide>.png|.tif) and detection CSVs (DIR/<slide>.csv); slides named in
    --exclude_slides (comma-separated, without case; the organisers' two by default, "" for none) are left out."""
    from pathbundles.metrics.commands import froc_command

    _print_json(froc_command(masks, detections, out, level0_mpp=level0_mpp, mask_downsample=mask_downsample,
                             exclude_slides=exclude_slides))


def mitosis_f1(truth: str, detections: str, out: str, radius_px: float = 30.0, score_threshold: float = 0.0,
               matching: str = "optimal") -> None:
    """Mitosis precision/recall/F1 from centroid CSVs (truth x,y; detections x,y,score), one file per image;
    --matching optimal (most pairs within the radius) or greedy (the challenge scorers': rows in file order)."""
    from pathbundles.metrics.commands import mitosis_f1_command

    _print_json(mitosis_f1_command(truth, detections, out, radius_px=radius_px, score_threshold=score_threshold,
                                   matching=matching))


def iou(truth: str, pred: str, out: str, num_classes: int) -> None:
    """Per-class IoU, recall, precision and mean IoU of PNG label maps (label 0 = unannotated, ignored)."""
    from pathbundles.metrics.commands import iou_command

    _print_json(iou_command(truth, pred, out, num_classes=num_classes))


def registry(*, tracking_uri: str | None = None) -> object:
    """MLflow model registry review: ``registry register|review|promote|export ...`` (see mlflow/README.md)."""
    from pathbundles.registry import Registry

    return Registry(tracking_uri=tracking_uri)


def deploy() -> object:
    """MONAI Deploy application packages: ``deploy build --bundle bundles/<name> --out DIR`` (or ``--model
    models:/<name>@champion [--tracking_uri URI]``); see docs/DEPLOY.md."""
    from pathbundles.deploy.build import Deploy

    return Deploy()


def dicom() -> object:
    """DICOMweb (PACS): ``dicom send URL FILES_OR_FOLDERS...``, ``dicom find URL [--study UID] [--modality SM]``,
    ``dicom fetch URL STUDY SERIES DEST``, ``dicom export OUTPUT_DIR DATA_SOURCE BUNDLE [--stow_url URL]``; URL is the
    server's DICOMweb base (see docs/DEPLOY.md)."""
    from pathbundles.dicomweb import Dicom

    return Dicom()


def cohort(bundle: str, slides: str, out: str, config: str | list[str] = "inference.json",
           timeout_hours: float = 72.0, slide_timeout_s: float | None = None, **overrides: Any) -> None:
    """Run BUNDLE over SLIDES (a folder, one slide, a text manifest or a datalist) into OUT, resumable; under
    torchrun every process takes a share balanced by slide area. ``--slide_timeout_s`` fails a slide that runs
    longer (seconds) and goes on. Further ``--key value`` flags set bundle config ids (see docs/COHORT.md)."""
    from pathbundles.cohort import cohort_cli

    cohort_cli(bundle, slides, out, config=config, timeout_hours=timeout_hours, slide_timeout_s=slide_timeout_s,
               **overrides)


COMMANDS = {
    "info": info,
    "tissue": tissue,
    "phantom": phantom,
    "froc": froc,
    "mitosis_f1": mitosis_f1,
    "iou": iou,
    "registry": registry,
    "deploy": deploy,
    "cohort": cohort,
    "dicom": dicom,
}


#: Commands whose verbs are the methods of a class (python-fire groups): command -> (module file, class). Their
#: modules import MLflow or MONAI (20-70 s), so help reads the verbs from the source.
GROUPS = {"registry": ("registry.py", "Registry"), "deploy": ("deploy/build.py", "Deploy"),
          "dicom": ("dicomweb.py", "Dicom")}

PACKAGE_DIR = Path(__file__).resolve().parent
HELP_FLAGS = ("--help", "-h")
WIDTH = 100


def _definitions(source: Path, class_name: str | None = None) -> tuple[dict[str, ast.FunctionDef], dict[str, Any]]:
    """The public functions of ``source`` (or the public methods of its class ``class_name``) and its module-level
    constants (``CHAMPION = "champion"``), which defaults name."""
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    body = tree.body if class_name is None else next(
        n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    functions = {n.name: n for n in body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    return functions, constants


def _summary(function: ast.FunctionDef) -> str:
    """The first paragraph of a docstring, on one line."""
    doc = ast.get_docstring(function) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _wrapped(text: str, indent: str = "") -> str:
    return "\n\n".join(textwrap.fill(" ".join(block.split()), WIDTH, initial_indent=indent,
                                     subsequent_indent=indent) for block in text.split("\n\n") if block.strip())


def _usage(line: str) -> str:
    return textwrap.fill(line.strip(), WIDTH, initial_indent="usage: ", subsequent_indent=" " * 7,
                         break_on_hyphens=False)


def _parameters(function: ast.FunctionDef, constants: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Usage words and described lines of ``function``'s parameters (``self`` left out)."""
    args = [a for a in function.args.args if a.arg != "self"]
    defaults = [None] * (len(args) - len(function.args.defaults)) + list(function.args.defaults)
    named = [(a, d) for a, d in zip(args, defaults) if d is not None]
    named += [(a, d) for a, d in zip(function.args.kwonlyargs, function.args.kw_defaults)]
    words, rows = [], []

    def row(left: str, annotation: ast.expr | None, default: ast.expr | None) -> tuple[str, str]:
        kind = ast.unparse(annotation) if annotation is not None else ""
        if default is not None:
            try:
                value = repr(constants[default.id] if isinstance(default, ast.Name) and default.id in constants
                             else ast.literal_eval(default))
            except ValueError:  # an expression: shown as written
                value = ast.unparse(default)
            kind += f"{', ' if kind else ''}default {value}"
        return left, kind

    for arg, default in zip(args, defaults):
        if default is None:
            words.append(arg.arg.upper())
            rows.append(row(arg.arg.upper(), arg.annotation, None))
    if function.args.vararg is not None:  # ``*paths``: one or more values
        words.append(f"{function.args.vararg.arg.upper()}...")
        rows.append(row(f"{function.args.vararg.arg.upper()}...", function.args.vararg.annotation, None))
    for arg, default in named:
        flag = f"--{arg.arg} {arg.arg.upper()}"
        words.append(flag if default is None else f"[{flag}]")  # a keyword-only argument without default
        rows.append(row(f"--{arg.arg} {arg.arg.upper()}", arg.annotation, default))
    if function.args.kwarg is not None:
        words.append("[--KEY VALUE ...]")
        rows.append(("--KEY VALUE", "further settings (see above)"))
    column = max((len(left) for left, _ in rows), default=0) + 2
    return words, [f"  {left:<{column}}{kind}" for left, kind in rows]


def _command_help(prefix: str, function: ast.FunctionDef, constants: dict[str, Any]) -> str:
    words, lines = _parameters(function, constants)
    return "\n".join([_usage(f"{prefix} {' '.join(words)}"), "", _wrapped(ast.get_docstring(function) or ""),
                      *(["", "arguments and flags:", *lines] if lines else [])])


def help_text(words: list[str]) -> tuple[str, int]:
    """Help for ``pathbundles WORDS... --help`` and the exit status: (text, 0), or (message, 2) for an unknown
    command or verb."""
    commands, constants = _definitions(Path(__file__))
    commands = {name: commands[name] for name in COMMANDS}
    if not words:
        rows = []
        for name, function in commands.items():
            summary = _summary(function)
            if name in GROUPS:
                verbs, _ = _definitions(PACKAGE_DIR / GROUPS[name][0], GROUPS[name][1])
                summary = f"verbs: {', '.join(verbs)}. {summary}"
            rows.append(textwrap.fill(summary, WIDTH, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15))
        return "\n".join(["usage: pathbundles COMMAND [ARGUMENTS] [--FLAG VALUE ...]", "",
                          "Slides, tissue masks, phantoms, metrics, the model registry, deployment and cohort runs "
                          "of the pathbundles bundles; results are printed as JSON.", "", "commands:", *rows, "",
                          "`pathbundles COMMAND --help` shows a command's arguments."]), 0
    name, rest = words[0], words[1:]
    if name not in commands:
        return f"pathbundles: error: no command {name!r}; the commands are {', '.join(commands)}", 2
    if name not in GROUPS:
        return _command_help(f"pathbundles {name}", commands[name], constants), 0
    verbs, verb_constants = _definitions(PACKAGE_DIR / GROUPS[name][0], GROUPS[name][1])
    group_words, group_lines = _parameters(commands[name], constants)
    prefix = " ".join(["pathbundles", name, *group_words])
    verb = next((w for w in rest if w in verbs), None)
    if verb is not None:
        return _command_help(f"{prefix} {verb}", verbs[verb], verb_constants), 0
    # a word that is not the value of a group flag (``--tracking_uri URI``) names a verb that does not exist
    unknown = [w for k, w in enumerate(rest) if not w.startswith("-")
               and not (k and rest[k - 1].startswith("--") and "=" not in rest[k - 1])]
    if unknown:
        return f"pathbundles: error: no verb {unknown[0]!r} of {name}; the verbs are {', '.join(verbs)}", 2
    rows = [textwrap.fill(_summary(f), WIDTH, initial_indent=f"  {v:<12} ", subsequent_indent=" " * 15)
            for v, f in verbs.items()]
    return "\n".join([_usage(f"{prefix} VERB [ARGUMENTS]"), "", _wrapped(ast.get_docstring(commands[name]) or ""),
                      "", "verbs:", *rows, *(["", "flags (before the verb):", *group_lines] if group_lines else []),
                      "", f"`pathbundles {name} VERB --help` shows a verb's arguments."]), 0


#: the start of the two notices :func:`quiet_third_party` drops
QUIETED_NOTICES = ("Current stack size (", "Add type hints to the `predict` method")


def quiet_third_party() -> None:
    """Silence two notices every command printed: Holoscan's stack-size warning (``import monai`` imports
    ``monai.deploy``, hence Holoscan, where the deploy extra is installed) and MLflow's request for type hints on the
    registry's model wrapper (whose ``predict`` is untyped on purpose: MLflow validates against its signature).

    The stack limit is raised to the 32 MiB Holoscan asks for where the hard limit allows: the main thread and the
    processes a command starts (torchrun workers) get it; threads already started keep theirs.
    """
    import resource
    import warnings

    wanted = 32 * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_STACK,
                               (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
        except (ValueError, OSError):
            pass
    # Dropped where shown, not by a filter: MLflow shows its notice under its own ``simplefilter("once")``.
    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not any(notice in str(message) for notice in QUIETED_NOTICES):
            previous(message, category, *args, **kwargs)

    warnings.showwarning = show


def _log_progress_lines() -> None:
    """Show pathbundles' INFO lines (progress of slow steps, :func:`pathbundles.progress.logged_steps`) on stderr,
    where nothing else configured logging; stdout keeps the JSON result alone."""
    import logging
    import sys

    package = logging.getLogger("pathbundles")
    if not logging.getLogger().handlers and not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def main() -> None:
    """Entry point of ``python -m pathbundles`` and the ``pathbundles`` console script.

    A bad input file ends the command with its message (file, line, problem) on stderr and exit status 2.
    """
    import sys

    args = sys.argv[1:]
    if not args or any(flag in args for flag in HELP_FLAGS):
        text, status = help_text([a for a in args if a not in (*HELP_FLAGS, "--")])
        print(text, file=sys.stdout if status == 0 else sys.stderr)
        sys.exit(status)
    if args[0] in GROUPS and not set(args[1:]) & set(_definitions(PACKAGE_DIR / GROUPS[args[0]][0],
                                                                 GROUPS[args[0]][1])[0]):
        print(help_text(args)[0], file=sys.stderr)  # a group without a verb: what the verbs are
        sys.exit(2)
    quiet_third_party()
    _log_progress_lines()

    import fire

    from pathbundles.errors import PathBundlesError

    try:
        fire.Fire(COMMANDS, name="pathbundles")
    except PathBundlesError as err:
        print(f"pathbundles: error: {err}", file=sys.stderr)
        sys.exit(2)
