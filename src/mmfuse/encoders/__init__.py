"""Image and text encoders; importing this package registers them all."""

from mmfuse.encoders import hf_text, timm_image, torchvision_image  # noqa: F401,E402  (registration)
from mmfuse.encoders.base import ENCODERS, Encoder, EncoderOutput

__all__ = ["ENCODERS", "Encoder", "EncoderOutput"]
