"""A test-only network with BatchNorm in its body and a Linear head, small enough to train in a second: fine-tuning's
frozen backbone keeps BatchNorm's running statistics (model.name=bn_model:BnNet, the <module>:<callable> form)."""
import torch.nn as nn
import torch.nn.functional as F


class BnNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Pooled(nn.Module):
    """No nn.Linear at all: a 1x1 conv ends it (as torchvision's squeezenet), so it has no head to train alone."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)
