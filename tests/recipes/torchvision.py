"""Recipe: torchvision resnet18 at 32x32 on coloured squares saved as PNG files."""

from recipes import Recipe
from recipes.images import image_row

RECIPE = Recipe("torchvision", {"model": "resnet18", "image_size": 32}, image_row)
