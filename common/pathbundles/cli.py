"""The ``pathbundles`` command line (python-fire). Each verb prints JSON and imports its module on demand."""

from __future__ import annotations

import json
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


def froc(masks: str, detections: str, out: str, level0_mpp: float = 0.243, mask_downsample: float = 32) -> None:
    """Camelyon16 FROC from tumour masks (DIR/<slide>.png|.tif) and detection CSVs (DIR/<slide>.csv)."""
    from pathbundles.metrics.commands import froc_command

    _print_json(froc_command(masks, detections, out, level0_mpp=level0_mpp, mask_downsample=mask_downsample))


def mitosis_f1(truth: str, detections: str, out: str, radius_px: float = 30.0, score_threshold: float = 0.0) -> None:
    """Mitosis precision/recall/F1 from centroid CSVs (truth x,y; detections x,y,score), one file per image."""
    from pathbundles.metrics.commands import mitosis_f1_command

    _print_json(mitosis_f1_command(truth, detections, out, radius_px=radius_px, score_threshold=score_threshold))


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
}


def main() -> None:
    """Entry point of ``python -m pathbundles`` and the ``pathbundles`` console script.

    A bad input file ends the command with its message (file, line, problem) on stderr and exit status 2.
    """
    import sys

    import fire

    from pathbundles.errors import PathBundlesError

    try:
        fire.Fire(COMMANDS, name="pathbundles")
    except PathBundlesError as err:
        print(f"pathbundles: error: {err}", file=sys.stderr)
        sys.exit(2)
