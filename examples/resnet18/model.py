"""ResNet-18 for TorchServe's eager mode: the one ``nn.Module`` class this file defines.

The loader imports this file, finds the single ``torch.nn.Module`` subclass defined here
(imported classes such as torchvision's ``ResNet`` do not count) and builds it with no
arguments, then loads the archive's ``state_dict`` into it.
"""

from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    """torchvision's resnet18 layout: BasicBlock, [2, 2, 2, 2], 1000 ImageNet classes."""

    def __init__(self) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])
