"""napari dock widgets (the only package that imports napari, Qt and magicgui)."""

from napari_medseg._llvm_guard import avoid_llvm_clash

# Before any widget imports torch: see napari_medseg/_llvm_guard.py.
avoid_llvm_clash(preload=True)
