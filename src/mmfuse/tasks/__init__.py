"""Task kinds (one file each) and heads; importing this package registers every kind.

Adding a kind is one file here that subclasses `Task` and registers it with `TASK_KINDS`, plus its import below.
"""

from mmfuse.tasks import binary, multiclass, multilabel, regression  # noqa: F401  (registration)
from mmfuse.tasks.base import MAX_LABEL_CHARS, TASK_KINDS, LabelError, Task, build_task
from mmfuse.tasks.binary import BinaryTask
from mmfuse.tasks.heads import HEADS, MLPHead
from mmfuse.tasks.multiclass import MulticlassTask
from mmfuse.tasks.multilabel import MultilabelTask
from mmfuse.tasks.regression import RegressionTask

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
