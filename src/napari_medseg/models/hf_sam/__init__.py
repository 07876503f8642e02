"""HF-SAM (Liu & Xu, CVIU 2025): SAM + LoRA + AWFFM fusion decoder, prompted and prompt-free."""

from napari_medseg.models.hf_sam.model import HFSAM

__all__ = ["HFSAM"]
