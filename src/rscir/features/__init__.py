"""Hand-crafted image features (no model weights): colour, LBP and Gabor texture."""

from .handcrafted import (
    HandcraftedDescriptor,
    describe,
    describe_arrays,
    to_working_array,
)

__all__ = ["HandcraftedDescriptor", "describe", "describe_arrays", "to_working_array"]
