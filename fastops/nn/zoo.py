"""ResNet-18, twice: as a PyTorch model (torchvision's layout, written out here because
torchvision is not a dependency) and built directly from fastops.nn layers (no torch needed).

Both use random weights and random batch-norm statistics: they exist to test and benchmark the
graph, not to classify images.
"""
from __future__ import annotations

import numpy as np

from . import layers as L

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)


def torch_resnet18(num_classes: int = 1000, seed: int = 0):
    """torchvision-style ResNet-18 (BasicBlock, [2, 2, 2, 2]) in eval mode, random weights."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.downsample = None
            if stride != 1 or c_in != c_out:
                self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                nn.BatchNorm2d(c_out))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            c_in, stages = 64, []
            for c_out, stride in STAGES:
                stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride),
                                            BasicBlock(c_out, c_out, 1)))
                c_in = c_out
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(seed)
    model = ResNet18()
    with torch.no_grad():  # non-trivial batch-norm statistics, so folding is really tested
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def _conv(rng, c_in, c_out, k, stride=1, padding=0):
    fan_in = c_in * k * k  # He init keeps activations O(1) through 18 layers
    w = rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / fan_in)
    return L.Conv2d(w, None, stride, padding)


def _bn(rng, c):
    return L.BatchNorm2d(rng.uniform(-0.1, 0.1, c), rng.uniform(0.5, 1.5, c),
                         rng.uniform(0.5, 1.5, c), rng.uniform(-0.1, 0.1, c))


def resnet18(num_classes: int = 1000, seed: int = 0, width: int = 64) -> L.Sequential:
    """ResNet-18 from fastops.nn layers (random weights). ``width`` scales the channel counts
    (64 is the real network; tests use a narrow one to stay fast)."""
    rng = np.random.default_rng(seed)
    scale = width / 64
    layers = [_conv(rng, 3, width, 7, 2, 3), _bn(rng, width), L.ReLU(), L.MaxPool2d(3, 2, 1)]
    c_in = width
    for channels, stride in STAGES:
        c_out = int(channels * scale)
        for block_stride in (stride, 1):
            down = None
            if block_stride != 1 or c_in != c_out:
                down = L.Sequential(_conv(rng, c_in, c_out, 1, block_stride), _bn(rng, c_out))
            layers.append(L.BasicBlock(_conv(rng, c_in, c_out, 3, block_stride, 1),
                                       _bn(rng, c_out), _conv(rng, c_out, c_out, 3, 1, 1),
                                       _bn(rng, c_out), down))
            c_in = c_out
    fc_w = rng.standard_normal((num_classes, c_in)) / np.sqrt(c_in)
    layers += [L.GlobalAvgPool2d(), L.Flatten(), L.Linear(fc_w, rng.uniform(-0.1, 0.1, num_classes))]
    return L.Sequential(*layers)
