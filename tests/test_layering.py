"""The layering rule: models and engine never import napari, Qt or magicgui."""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import napari_medseg

SRC = Path(napari_medseg.__file__).parent


def non_widget_modules() -> list[str]:
    names = ["napari_medseg", "napari_medseg.cli", "napari_medseg.io_napari", "napari_medseg._sample_data"]
    for sub in ("models", "engine"):
        pkg = f"napari_medseg.{sub}"
        names.append(pkg)
        for info in pkgutil.walk_packages([str(SRC / sub)], prefix=pkg + "."):
            names.append(info.name)
    return names


def test_models_and_engine_import_no_gui():
    mods = non_widget_modules()
    assert any(m.startswith("napari_medseg.engine.networks.") for m in mods)
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "import napari_medseg as n\n"
        "n.list_models()\n"
        "gui = ('qtpy', 'napari', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6')\n"
        "bad = sorted(k for k in gui if k in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_package_import_is_light():
    code = "import sys, napari_medseg; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_models_package_is_pure_torch():
    banned = re.compile(
        r"^\s*(from|import)\s+(napari(\.|\s|$)|qtpy|magicgui|numpy|napari_medseg\.(engine|widgets))", re.M
    )
    for path in (SRC / "models").rglob("*.py"):
        hit = banned.search(path.read_text())
        assert hit is None, f"{path.name}: {hit.group(0).strip() if hit else ''}"


def test_no_print_in_src():
    for path in SRC.rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.strip().startswith("print("), f"print() in {path}"
