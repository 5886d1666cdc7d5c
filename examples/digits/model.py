"""Small CNN for the 8x8 scikit-learn digits data set.

TorchServe's eager-mode loader imports this file and instantiates the single
``torch.nn.Module`` subclass it finds, with no arguments, so this file must
define exactly one such class and nothing else that runs at import time.
"""

import torch
from torch import nn


class DigitsNet(nn.Module):
    """Classifies a N x 1 x 8 x 8 float tensor (pixels in [0, 1]) into 10 digits.

    Returns raw logits; softmax is left to the caller (TorchServe's
    ImageClassifier applies it in postprocess).
    """

    def __init__(self) -> None:
        super().__init__()
        # Padding keeps the tiny 8x8 grid intact through both convolutions;
        # one pooling step (8 -> 4) is all the resolution can afford.
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
