"""The operators of a bundle application (MONAI Deploy App SDK, Holoscan): list the slides, run the bundle, write
the summary. Each passes one Python object to the next: the datalist, then the bundle's records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.deploy.core import Fragment, Operator, OperatorSpec

from pathbundles.dicomweb import is_dicomweb_url
from pathbundles.deploy.runtime import (AppSettings, export_dicom_results, slide_list, store_dicom_results, summarize,
                                        write_summary)
from pathbundles.outputs import DICOM_SUBFOLDER

logger = logging.getLogger(__name__)


class SlideListLoaderOperator(Operator):
    """Emits the datalist of the application's input on port ``datalist``.

    Args:
        fragment: the application.
        input_path: a folder of slides (HPF images for ``kind="mitosis"``) or of DICOM instances, a datalist
            ``.json``, one slide, a DICOMweb series URL, or a text manifest of slide paths or series URLs (see
            :func:`pathbundles.deploy.runtime.slide_list`).
        kind: the bundle's input kind: "metastasis", "mitosis" or "multiclass".
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: str | os.PathLike, kind: str,
                 **kwargs: Any) -> None:
        # A URL stays a string (a Path folds its "//"); HOLOSCAN_INPUT_PATH may hold one too.
        self.input_path = input_path if is_dicomweb_url(input_path) else Path(input_path)
        self.kind = kind
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("datalist")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        items = slide_list(self.input_path, self.kind)
        logger.info("%d input(s) from %s", len(items), self.input_path)
        op_output.emit(items, "datalist")


class BundleInferenceOperator(Operator):
    """Runs the bundle's inference workflow (MONAI ``ConfigWorkflow``, type "infer") on the datalist received on
    port ``datalist``, writing the bundle's outputs into ``output_dir``; emits ``{"datalist", "records", "failed",
    "bundle"}`` on port ``results`` (the writer's per-slide records, {name: why} of the slides that failed, and
    :func:`~pathbundles.bundle_runner.bundle_info`). A slide that fails does not stop the others.

    Args:
        fragment: the application.
        bundle: the bundle folder.
        output_dir: the run's output folder (the config's ``output_dir``).
        config_files: config names in the bundle's ``configs/``, merged in order.
        overrides: further config ids to set (``ckpt_path``, ``num_workers``, ...).
    """

    def __init__(self, fragment: Fragment, *args: Any, bundle: str | os.PathLike, output_dir: str | os.PathLike,
                 config_files: Sequence[str] = ("inference.json",), overrides: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.bundle = Path(bundle)
        self.output_dir = Path(output_dir)
        self.config_files = list(config_files)
        self.overrides = dict(overrides or {})
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("datalist")
        spec.output("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from pathbundles.bundle_runner import bundle_info, run_inference

        items = op_input.receive("datalist")
        failed: dict[str, str] = {}
        records = run_inference(self.bundle, items, self.output_dir, config_files=self.config_files,
                                overrides=self.overrides, failures=failed)
        info = bundle_info(self.bundle, config_files=self.config_files, overrides=self.overrides)
        op_output.emit({"datalist": items, "records": records, "failed": failed, "bundle": info}, "results")


class ResultWriterOperator(Operator):
    """Writes the DICOM results of the slides from DICOM into ``output_dir/dicom/`` and stores them to the settings'
    STOW-RS URL when there is one (:func:`pathbundles.deploy.runtime.export_dicom_results`,
    :func:`~pathbundles.deploy.runtime.store_dicom_results`), then ``summary.json`` from the results received on port
    ``results``: per slide its score, detection count and output files (relative to ``output_dir``), its DICOM
    results, or why it failed, with the bundle's name, version and weights hash
    (:func:`pathbundles.deploy.runtime.summarize`). The slides that failed are kept in :attr:`failed`, those whose
    DICOM results were not written or stored in :attr:`dicom_failed`; the application's
    :func:`~pathbundles.deploy.app.main` reports both at its end.

    Args:
        fragment: the application.
        output_dir: the run's output folder.
        settings: the application's settings (recorded in the summary).
    """

    def __init__(self, fragment: Fragment, *args: Any, output_dir: str | os.PathLike, settings: AppSettings,
                 **kwargs: Any) -> None:
        self.output_dir = Path(output_dir)
        self.settings = settings
        #: {slide name: why} of the slides that failed.
        self.failed: dict[str, str] = {}
        #: how many slides were written.
        self.n_written = 0
        #: {slide name: why} of the slides whose DICOM results were not written or not stored.
        self.dicom_failed: dict[str, str] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        results = op_input.receive("results")
        self.failed, self.n_written = dict(results["failed"]), len(results["records"])
        dicom = export_dicom_results(results["records"], results["datalist"], self.output_dir, results["bundle"])
        if self.settings.stow_url and dicom:
            dicom = store_dicom_results(dicom, self.settings.stow_url)
        self.dicom_failed = {name: d["failed"] for name, d in dicom.items() if "failed" in d}
        summary = summarize(results["records"], results["bundle"], self.output_dir, datalist=results["datalist"],
                            settings=self.settings, failed=self.failed, dicom=dicom)
        path = write_summary(summary, self.output_dir)
        logger.info("summary of %d slide(s), %d failed: %s", summary["n_slides"], len(self.failed), path)
        if dicom:
            logger.info("DICOM results of %d slide(s) in %s%s, %d failed", len(dicom), self.output_dir / DICOM_SUBFOLDER,
                        f", stored to {self.settings.stow_url}" if self.settings.stow_url else "",
                        len(self.dicom_failed))
        if summary["bundle"]["weights_warning"]:
            logger.warning("%s (%s)", summary["bundle"]["weights_warning"], path)
