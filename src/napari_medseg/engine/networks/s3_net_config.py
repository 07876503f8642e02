"""S³-Net's model card, the Segment widget's run options, and the named recipes.

Kept apart from the runner (``s3_net.py``) so that what a user can set, and what each option
measured, reads in one place (figures: docs/models/s3-net.md).
"""

from __future__ import annotations

from napari_medseg.engine.registry import ModelCard
from napari_medseg.engine.run_options import RunOption, RunRecipe
from napari_medseg.models.s3_net import MODES

CARD = ModelCard(
    name="s3-net",
    title="S³-Net (self-supervised clustering)",
    paper=(
        "S. Karimijafarbigloo, R. Azad, A. Kazerouni, Y. Velichko, U. Bagci, D. Merhof. "
        "Self-supervised Semantic Segmentation: Consistency over Transformation. "
        "ICCV 2023 Workshops (CVAMD), pp. 2654-2663; arXiv 2309.00143"
    ),
    doi="10.1109/ICCVW60793.2023.00280",
    spatial_dims=2,
    promptable=False,
    needs_labels=False,
    trainable=False,
    input_size=(256, 256),
    default_preset="auto",
    weights="none: a new network is optimised on every image",
    weights_licence="none",
    output="clusters",
    summary=(
        "Label-free: optimises a small network on each image until its pixels fall into a few "
        "clusters (ids 1..K, 1 = largest). Keep the clusters under the lesion with a click."
    ),
    docs="docs/models/s3-net.md",
    tags=("self-supervised", "clustering", "2d"),
)

# S³-Net builds a new network for every image, so even its width is a run-time choice.
RUN_OPTIONS = (
    RunOption(
        "mode",
        "Mode",
        "choice",
        "paper",
        "paper: what the paper describes (any size); released: the authors' notebook (256², free offsets)",
        choices=MODES,
    ),
    RunOption(
        "restarts",
        "Runs per image",
        "int",
        1,
        "Optimise several times with different seeds and keep the clusters the runs agree on "
        "(their consensus, weighted by pixels). Seven 16-channel runs with flatten 0.25 and "
        "regions (recipe 'consensus') give PH² best region 0.870 against 0.748 for one "
        "64-channel run with regions; little gain on ultrasound or endoscopy; costs that many "
        "times as long",
        minimum=1,
        maximum=10,
    ),
    RunOption(
        "channels",
        "Channels",
        "int",
        64,
        "Width of the network and the most clusters it can form (64 as in the paper). 16 costs "
        "about a seventh per iteration and, with several runs combined, scores higher on "
        "dermoscopy (recipe 'consensus'); on its own it loses on ultrasound (BUSI)",
        minimum=2,
        maximum=256,
        step=8,
    ),
    RunOption(
        "flatten",
        "Flatten shading",
        "float",
        0.0,
        "Divide out vignetting and slow shading first (blur width as a share of the image; "
        "0 = off, as in the paper; 0.25 helped on dermoscopy, PH² 0.675 → 0.729)",
        maximum=0.5,
        step=0.05,
    ),
    RunOption(
        "regions",
        "Split into connected regions",
        "bool",
        False,
        "Give every connected piece of a cluster its own id (specks under 1 % join a neighbour), "
        "so a lesion is apart from dark corners or hair of its colour: the best single region "
        "is then what one click with 'only the connected piece' keeps. Off = the paper's clusters",
    ),
    RunOption(
        "working_size",
        "Working size",
        "int",
        0,
        "Longest side the optimisation runs at, in pixels (0 = the mode's default: paper 128, "
        "released 256); larger follows finer detail and costs about 4× per doubling",
        maximum=1024,
        step=32,
        minimum_text="auto",
    ),
    RunOption(
        "max_iter",
        "Max iterations",
        "int",
        50,
        "Stop after this many iterations even when more clusters remain than the stop rule wants",
        minimum=1,
        maximum=1000,
    ),
    RunOption("seed", "Seed", "int", 0, "Base seed (slice z of a volume uses seed + z)", maximum=2**31 - 1),
)

RUN_RECIPES = (
    RunRecipe(
        "paper",
        "Paper (1 run, 64 channels)",
        "The paper's network and losses, one run per image (the defaults)",
    ),
    RunRecipe(
        "consensus",
        "Consensus (7 fast runs)",
        "Seven seeded runs of a 16-channel network on the shading-flattened image, combined by "
        "consensus and split into connected regions. PH² (100 images) best-region Dice 0.709 → "
        "0.870 and one-click Dice 0.655 → 0.802 in about 60 % of the time of the defaults. "
        "Ultrasound and endoscopy stay poor either way (20 images, best region / one click: "
        "BUSI 0.293 / 0.192 → 0.422 / 0.224, Kvasir-SEG 0.450 / 0.293 → 0.443 / 0.283)",
        (("channels", 16), ("restarts", 7), ("flatten", 0.25), ("regions", True)),
    ),
)
