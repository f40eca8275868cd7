"""torchvision's ``SqueezeExcitation``, rebuilt from ``torch.nn``: the reference of the benchmarks and the tests.

torchvision has no CPU wheel at hand, so this is the one copy in the code (``tests/helpers.py`` imports
it; the porting notebook writes its own, so that a reader can run it on its own).
The module imports without torch (the class then exists but cannot be built), so that test files that
name it still import on Pythons without torch, where the tests that build it skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.nn import Module
else:
    try:
        from torch.nn import Module
    except ImportError:
        Module = object


class TorchSqueezeExcitation(Module):
    """``torchvision.ops.SqueezeExcitation``: the same submodules, ``state_dict`` keys and numbers."""

    def __init__(self, input_channels: int, squeeze_channels: int, activation=None, scale_activation=None):
        import torch

        super().__init__()
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1 = torch.nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = torch.nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation or torch.nn.ReLU()
        self.scale_activation = scale_activation or torch.nn.Sigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x
