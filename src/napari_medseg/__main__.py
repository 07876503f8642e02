"""``python -m napari_medseg`` runs the command line."""

from napari_medseg.cli import main

raise SystemExit(main())
