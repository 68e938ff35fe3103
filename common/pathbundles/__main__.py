"""``python -m pathbundles ...``: see :mod:`pathbundles.cli`."""

from pathbundles.cli import main

main()
