"""Encoders, one file per encoder; each module is imported (and registers its encoder) when its
name is first asked for (`mmfuse.registry`): a run without a timm encoder never imports timm.

Adding a modality is one file here (or in `$MMFUSE_PLUGINS/encoders/`): a subclass of `Encoder` registered with
`@ENCODERS.register("name")`, plus its tiny test recipe, either `tests/recipes/<name>.py` or a module-level
`TEST_RECIPE = {"options": {...}, "row": row}` in the same file (see tests/recipes/__init__.py).
"""

from mmfuse.encoders.base import ENCODERS, DataRoot, Encoder, EncoderOutput, InputError
from mmfuse.registry import import_modules

import_modules(__name__, __path__)

__all__ = ["ENCODERS", "DataRoot", "Encoder", "EncoderOutput", "InputError"]
