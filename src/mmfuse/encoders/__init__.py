"""Image and text encoders; importing this package registers them all."""

import mmfuse.encoders.embedding  # noqa: F401  (registration)
import mmfuse.encoders.tabular  # noqa: F401  (registration)
from mmfuse.encoders import hf_text, timm_image, torchvision_image  # noqa: F401,E402  (registration)
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput

__all__ = ["ENCODERS", "Encoder", "EncoderOutput"]
