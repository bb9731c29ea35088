"""Task kinds (one file each) and heads; importing this package imports every module in it, which registers them.

Adding a kind is one file here: a subclass of `Task` registered with `@TASK_KINDS.register("name")`.
"""

import importlib
import pkgutil

from mmfuse.tasks.base import MAX_LABEL_CHARS, TASK_KINDS, LabelError, Task, build_task
from mmfuse.tasks.binary import BinaryTask
from mmfuse.tasks.heads import HEADS, MLPHead
from mmfuse.tasks.multiclass import MulticlassTask
from mmfuse.tasks.multilabel import MultilabelTask
from mmfuse.tasks.regression import RegressionTask

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "HEADS",
    "MAX_LABEL_CHARS",
    "TASK_KINDS",
    "BinaryTask",
    "LabelError",
    "MLPHead",
    "MulticlassTask",
    "MultilabelTask",
    "RegressionTask",
    "Task",
    "build_task",
]
