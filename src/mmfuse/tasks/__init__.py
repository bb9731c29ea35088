"""Task kinds (one file each) and heads; each module is imported (and registers its components)
when one of its names is first asked for (`mmfuse.registry`).

Adding a kind is one file here (or in `$MMFUSE_PLUGINS/tasks/`): a subclass of `Task` registered with
`@TASK_KINDS.register("name")` that declares `example_labels`; tests/test_tasks.py covers it from then on.
"""

from mmfuse.registry import import_modules
from mmfuse.tasks.base import MAX_LABEL_CHARS, TASK_KINDS, LabelError, Task, build_task
from mmfuse.tasks.binary import BinaryTask
from mmfuse.tasks.heads import HEADS, MLPHead
from mmfuse.tasks.multiclass import MulticlassTask
from mmfuse.tasks.multilabel import MultilabelTask
from mmfuse.tasks.regression import RegressionTask

import_modules(__name__, __path__)

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
