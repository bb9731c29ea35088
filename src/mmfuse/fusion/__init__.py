"""Fusion modules, one file each; each module is imported (and registers its fusion) when its
name is first asked for (`mmfuse.registry`).

Adding a fusion is one file here (or in `$MMFUSE_PLUGINS/fusion/`): a subclass of `Fusion` registered with
`@FUSIONS.register("name")`; tests/fusion/test_fusion_contract.py covers it from then on.
"""

from mmfuse.fusion.base import FUSIONS, Fusion, FusionOutput
from mmfuse.registry import import_modules

import_modules(__name__, __path__)

__all__ = ["FUSIONS", "Fusion", "FusionOutput"]
