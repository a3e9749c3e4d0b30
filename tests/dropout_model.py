"""A test-only network that draws from the global torch RNG in every training step, registered as `dropout_net`:
dropout, plus a number of extra draws that depends on the batch, so that ranks seeing different images end up with
different RNG states. A resume that did not restore each rank's own RNG states would train on other masks."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar.models import NUM_CLASSES, register


@register("dropout_net")
class DropoutNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=2)
        self.fc1 = nn.Linear(8 * 14 * 14, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        if self.training:      # as many draws as images whose first pixel is above the mean: data-dependent
            torch.rand(int((x[:, 0, 0, 0] > 0).sum()))
        x = F.dropout(F.relu(self.conv(x)), 0.2, self.training).flatten(1)
        return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.5, self.training))
