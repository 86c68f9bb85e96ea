"""Models of the training driver: MLPs for the small default data, and the CIFAR ResNets of the
KD literature (He et al.'s 6n+2 CIFAR ResNets; 'x4' are the 4x wider ones of RepDistiller)."""
import torch
from torch import nn


def mlp(in_features, num_classes, hidden):
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, in_planes = [], widths[0]
        for stage, planes in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def features(self, x):
        x = self.blocks(torch.relu(self.bn(self.conv(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))


RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)), "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)), "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)), "resnet32x4": (32, (32, 64, 128, 256)),
}
MLPS = {"mlp_large": (256, 256), "mlp_small": (32,), "mlp_tiny": (16,)}
ARCHITECTURES = sorted(RESNETS) + sorted(MLPS)


def build(name, dataset):
    if name in RESNETS:
        if not dataset.image:
            raise ValueError(f"architecture {name} needs image data (cifar10/cifar100), not "
                             f"{dataset.name}")
        depth, widths = RESNETS[name]
        return CifarResNet(depth, widths, dataset.num_classes)
    if name in MLPS:
        return mlp(dataset.x_train[0].numel(), dataset.num_classes, MLPS[name])
    raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(ARCHITECTURES)}")


def features_and_head(model):
    """(features function, the final nn.Linear): the classifier that --vocab-parallel splits by
    its output classes."""
    if isinstance(model, CifarResNet):
        return model.features, model.fc
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        return model[:-1], model[-1]
    raise ValueError(f"no final linear classifier found in {type(model).__name__}")
