"""Encoders, one file per encoder; importing this package imports every module in it, which registers them.

Adding a modality is one file here: a subclass of `Encoder` registered with `@ENCODERS.register("name")`.
"""

import importlib
import pkgutil

from mmfuse.encoders.base import ENCODERS, DataRoot, Encoder, EncoderOutput, InputError

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ENCODERS", "DataRoot", "Encoder", "EncoderOutput", "InputError"]
