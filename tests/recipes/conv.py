"""Recipe: a 2-block conv encoder at 32x32 on coloured squares, its weights from a file (freezing needs them)."""

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmfuse.encoders.conv import ConvImageEncoder
from recipes import Recipe
from recipes.images import image_row

NET = {"image_size": 32, "depth": 2, "width": [4, 6], "stride": 2}


def weights_file() -> str:
    """The network's seeded initial weights as a safetensors file (rewritten atomically on every import)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in ConvImageEncoder(**NET).net.state_dict().items()}
    path = Path(tempfile.gettempdir()) / f"mmfuse-recipe-conv-{os.getuid()}.safetensors"
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file(state, str(partial))
    os.replace(partial, path)
    return str(path)


RECIPE = Recipe("conv", {**NET, "weights": weights_file()}, image_row)
