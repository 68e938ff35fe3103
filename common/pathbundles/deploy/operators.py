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

from pathbundles.deploy.runtime import AppSettings, slide_list, summarize, write_summary

logger = logging.getLogger(__name__)


class SlideListLoaderOperator(Operator):
    """Emits the datalist of the application's input on port ``datalist``.

    Args:
        fragment: the application.
        input_path: a folder of slides (HPF images for ``kind="mitosis"``), a datalist ``.json``, one slide, or a
            text manifest of slide paths (see :func:`pathbundles.deploy.runtime.slide_list`).
        kind: the bundle's input kind: "metastasis", "mitosis" or "multiclass".
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: str | os.PathLike, kind: str,
                 **kwargs: Any) -> None:
        self.input_path = Path(input_path)
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
    """Writes ``summary.json`` into ``output_dir`` from the results received on port ``results``: per slide its
    score, detection count and output files (relative to ``output_dir``), or why it failed, with the bundle's name,
    version and weights hash (:func:`pathbundles.deploy.runtime.summarize`). The slides that failed are kept in
    :attr:`failed`, which the application's :func:`~pathbundles.deploy.app.main` reports at its end.

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
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        results = op_input.receive("results")
        self.failed, self.n_written = dict(results["failed"]), len(results["records"])
        summary = summarize(results["records"], results["bundle"], self.output_dir, datalist=results["datalist"],
                            settings=self.settings, failed=self.failed)
        path = write_summary(summary, self.output_dir)
        logger.info("summary of %d slide(s), %d failed: %s", summary["n_slides"], len(self.failed), path)
        if summary["bundle"]["weights_warning"]:
            logger.warning("%s (%s)", summary["bundle"]["weights_warning"], path)
