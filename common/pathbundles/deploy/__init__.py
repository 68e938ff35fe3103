"""Bundles as MONAI Deploy applications (MAPs) that drive the bundle's own inference workflow.

MONAI Deploy's ``MonaiBundleInferenceOperator`` runs a bundle's pre/post-processing and inferer on one in-memory
image; a whole-slide pipeline (tissue ROIs streamed from disk, stitched maps, per-slide writers) does not fit it. The
application built here keeps the bundle the single source of truth instead: its operators list the input slides,
run the bundle's ``configs/inference.json`` through MONAI's ``ConfigWorkflow`` (:mod:`pathbundles.bundle_runner`)
and write one summary. See docs/DEPLOY.md.

Modules:

- :mod:`~pathbundles.deploy.build`: ``python -m pathbundles deploy build``, the MAP build context of a bundle folder
  or of a registered model (no SDK needed).
- :mod:`~pathbundles.deploy.runtime`: what the application does, without the SDK: its settings (``app.yaml``,
  ``--override``), the slide list, the summary.
- :mod:`~pathbundles.deploy.operators`: the three operators (SDK needed).
- :mod:`~pathbundles.deploy.app`: the application class and the entry point of a built ``app.py`` (SDK needed).
"""
