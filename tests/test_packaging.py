"""The wheel carries napari.yaml and the sample data; npe2 validates it from a wheel install."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("napari_medseg-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "napari_medseg/napari.yaml" in names
    for f in ("README.md", "retina_fundus.png", "mni152_t1_2mm.nii.gz", "mni152_tissue_2mm.nii.gz"):
        assert f"napari_medseg/sample_data/{f}" in names, f
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Classifier: Framework :: napari" in meta
    assert "Requires-Dist: pyqt" not in meta.lower().split("provides-extra")[0]


def test_npe2_validate_from_wheel_install(wheel, tmp_path):
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    py = env / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The wheel goes into the fresh venv; its dependencies come from this environment.
    zipfile.ZipFile(wheel).extractall(site)
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    code = (
        "import napari_medseg, sys;"
        f"assert napari_medseg.__file__.startswith({site!r}), napari_medseg.__file__;"
        "from npe2.cli import main; sys.argv=['npe2','validate','napari-medseg']; main()"
    )
    res = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "valid" in (res.stdout + res.stderr).lower()
