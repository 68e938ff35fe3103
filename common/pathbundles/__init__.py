"""pathbundles: shared slide layer, samplers, post-processing, metrics and method code for the four bundles.

Submodules are imported on demand (``import pathbundles.wsi``) so that ``import pathbundles`` stays cheap.
"""

__version__ = "0.1.0"
