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


# --task lm: a decoder-only transformer from torch's own modules; architectures are
# "<layers>x<width>", e.g. "4x256" (heads of 64 dimensions)

class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (F.scaled_dot_product_attention), MLP."""

    def __init__(self, width):
        super().__init__()
        self.heads = max(1, width // 64)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).permute(
            2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """forward(ids [B, L]) -> the last hidden states [B, L, width]; the lm_head is applied by the
    loss (full logits, or fused with it). `vocab_size` rows of embedding and lm_head: a padded
    teacher has more than the tokenizer's vocabulary."""

    def __init__(self, layers, width, vocab_size, context):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab_size, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        return self.ln(self.blocks(x))

    def logits(self, ids):
        return self.lm_head(self(ids))


def parse_gpt(arch):
    """'4x256' -> (4, 256), or ValueError."""
    parts = arch.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts) \
            or int(parts[1]) % 64 and int(parts[1]) > 64:
        raise ValueError(f"a language-model architecture is <layers>x<width>, the width a "
                         f"multiple of 64 or at most 64, e.g. 4x256; got {arch!r}")
    return int(parts[0]), int(parts[1])


def build_gpt(arch, vocab_size, context):
    layers, width = parse_gpt(arch)
    return GPT(layers, width, vocab_size, context)
