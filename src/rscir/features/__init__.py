"""Hand-crafted image features (no model weights): colour, LBP and Gabor texture."""

from .handcrafted import (
    HandcraftedDescriptor,
    describe,
    describe_arrays,
    to_working_array,
)
from .multispectral import MultispectralDescriptor

__all__ = ["HandcraftedDescriptor", "MultispectralDescriptor", "describe", "describe_arrays", "to_working_array"]
