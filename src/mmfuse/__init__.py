"""mmfuse: multi-task, multi-modal learning (image + text encoders, fusion, multi-task heads, a CLI).

Heavy submodules are imported on first use, so `import mmfuse` stays fast.
"""

from __future__ import annotations

from mmfuse.lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "build_model": "mmfuse.builders",
    "load_config": "mmfuse.config",
    "MultiTaskModel": "mmfuse.model",
    "ModelOutput": "mmfuse.model",
    "EncoderOutput": "mmfuse.encoders.base",
    "FusionOutput": "mmfuse.fusion.base",
    "ENCODERS": "mmfuse.encoders",
    "FUSIONS": "mmfuse.fusion",
    "TASK_KINDS": "mmfuse.tasks",
    "build_task": "mmfuse.tasks",
    "MultiTaskPredictor": "mmfuse.predictor",
    "plan_inputs": "mmfuse.infer",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
