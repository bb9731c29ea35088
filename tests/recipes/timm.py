"""Recipe: timm resnet18 (random weights) at 32x32 on coloured squares saved as PNG files."""

from recipes import Recipe
from recipes.images import image_row

RECIPE = Recipe("timm", {"model": "resnet18", "weights": None, "image_size": 32}, image_row)
