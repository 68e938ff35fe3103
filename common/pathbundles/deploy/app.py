"""The application of a built bundle MAP: slide list -> bundle inference -> summary, and its entry point.

A built application's ``app.py`` calls :func:`main` with its own folder::

    python APP_DIR -i INPUT -o OUTPUT [--override KEY=VALUE ...] [--stow_url URL] [-l DEBUG]

``-i``/``-o`` default to ``$HOLOSCAN_INPUT_PATH``/``$HOLOSCAN_OUTPUT_PATH`` (set inside a MAP), else ``input`` and
``output``. ``INPUT`` may be a DICOMweb series URL. Holoscan wants an 8 MB+ stack: run ``ulimit -s 32768`` first, or it warns.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application

from pathbundles.deploy.operators import BundleInferenceOperator, ResultWriterOperator, SlideListLoaderOperator
from pathbundles.deploy.runtime import AppSettings, load_settings, split_dicom_args, split_override_args
from pathbundles.errors import PathBundlesError, SlidesFailedError

USAGE = """pathbundles options (before or after the SDK's):
  --override KEY=VALUE  set a bundle config id for this run (repeatable; values as for python -m monai.bundle run,
                        e.g. --override num_workers=0 --override ckpt_path=/models/other.pt); the pathbundles
                        section of app.yaml gives the defaults
  --stow_url URL        store the DICOM results of slides read from DICOM to this DICOMweb server (STOW-RS;
                        default: dicom.stow_url of app.yaml; "" for none)
  -i URL                a DICOMweb series URL (http(s)://HOST/dicom-web/studies/UID/series/UID) as the input
"""


class BundleApplication(Application):
    """A MONAI Deploy application that runs one bundle's own inference workflow on a folder or list of slides.

    Operators: :class:`~pathbundles.deploy.operators.SlideListLoaderOperator` (once) ->
    :class:`~pathbundles.deploy.operators.BundleInferenceOperator` ->
    :class:`~pathbundles.deploy.operators.ResultWriterOperator`. The output folder receives what
    ``python -m monai.bundle run --output_dir`` writes for the same slides, plus ``summary.json``.

    Args:
        settings: the bundle, its input kind, configs and overrides (:func:`~pathbundles.deploy.runtime.load_settings`).
        argv: the command line (``[sys.executable, script, *options]``), without ``--override`` and ``--stow_url``
            options and without a URL input.
        input_url: a DICOMweb series URL to read instead of the SDK's input path.
    """

    def __init__(self, settings: AppSettings, argv: Sequence[str] | None = None,
                 input_url: str | None = None) -> None:
        self.settings = settings
        self.input_url = input_url
        self.result_writer: ResultWriterOperator | None = None  # made by compose()
        super().__init__(list(argv) if argv else None)
        self.name = f"pathbundles-{settings.bundle.name}"

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        loader = SlideListLoaderOperator(self, CountCondition(self, 1),
                                         input_path=self.input_url or context.input_path, kind=self.settings.kind,
                                         name="slide_list_loader")
        # Every operator runs once: one left waiting for input made the scheduler stop a good run with "Some
        # entities are waiting for execution" (a deadlock message).
        inference = BundleInferenceOperator(self, CountCondition(self, 1), bundle=self.settings.bundle,
                                            output_dir=context.output_path, config_files=self.settings.config_files,
                                            overrides=self.settings.overrides, name="bundle_inference")
        self.result_writer = ResultWriterOperator(self, CountCondition(self, 1), output_dir=context.output_path,
                                                  settings=self.settings, name="result_writer")
        self.add_flow(loader, inference, {("datalist", "datalist")})
        self.add_flow(inference, self.result_writer, {("results", "results")})


def main(app_dir: str | os.PathLike, argv: Sequence[str] | None = None) -> None:
    """Run the application built in ``app_dir`` with the command line ``argv`` (default ``sys.argv``)."""
    argv = list(sys.argv if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
    try:
        overrides, rest = split_override_args(argv)
        stow_url, input_url, rest = split_dicom_args(rest)
        settings = load_settings(app_dir, overrides, stow_url=stow_url)
    except PathBundlesError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    app = BundleApplication(settings, [sys.executable, *rest], input_url=input_url)
    app.run()
    writer = app.result_writer
    del app  # Holoscan logs the end of its context when the application goes: before the last line, not after
    gc.collect()
    if writer is not None and writer.failed:  # summary.json lists them with the others; the run still fails
        print(f"error: {SlidesFailedError.listing(writer.failed, written=writer.n_written)}", file=sys.stderr)
    if writer is not None and writer.dicom_failed:  # likewise: results not written or not stored are not dropped
        listing = "; ".join(f"{name}: {why}" for name, why in writer.dicom_failed.items())
        print(f"error: the DICOM results of {len(writer.dicom_failed)} slide(s) failed: {listing}", file=sys.stderr)
    if writer is not None and (writer.failed or writer.dicom_failed):
        raise SystemExit(2)
