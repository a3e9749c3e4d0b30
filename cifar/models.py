"""Networks, chosen by model.name: the registry's own (tutorial_net, resnet18, fastnet; add one with
@MODELS.register("name") on a callable that takes num_classes, the size of the head, and returns an nn.Module), any
torchvision classification model as torchvision:<name>, a timm model as timm:<name> (the optional extra
pip install -e ".[timm]"), or a network of one's own as <module>:<callable> (docs/extending.md)."""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .registry import Registry, spelled

NUM_CLASSES = 10          # CIFAR-10's: the default head
MODELS = Registry("model", "model.name", forms=("torchvision:<name>", "timm:<name>"))
register = MODELS.register        # @register("name"), as models were registered before every component had one

# model.cifar_stem's family: torchvision's ResNets, whose ImageNet stem (7x7 stride-2 conv, 3x3 max-pool) shrinks a
# 32x32 image to 8x8 before the first block. Each of them names that stem conv1 and maxpool.
CIFAR_STEM_FAMILY = re.compile(r"resnet\d+|resnext\d+_\d+x\d+d|wide_resnet\d+_\d+")
# torchvision builders that need more than their defaults to give logits in training: no auxiliary heads (with
# them, training returns a tuple)
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
TORCHVISION_REFUSED = {"inception_v3": "needs images of at least 75x75 pixels"}


def build_model(name: str, num_classes: int = NUM_CLASSES, cifar_stem: bool = False) -> nn.Module:
    """The network model.name names, its head sized num_classes, initialised from the global torch RNG."""
    check_name(name, cifar_stem)
    source, _, arch = name.partition(":")
    if source == "torchvision":
        return torchvision_model(arch, num_classes, cifar_stem)
    if source == "timm":
        return _timm(name).create_model(arch, pretrained=False, num_classes=num_classes)
    model = MODELS[name](num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise UserError(f"model.name={spelled(name)}: called with num_classes={num_classes}, it returned a "
                        f"{type(model).__name__}, not a torch.nn.Module; make it return the network")
    return model


def model_from_config(cfg, num_classes: int) -> nn.Module:
    """build_model for the model config section (cfg: a ModelConfig)."""
    return build_model(cfg.name, num_classes, cifar_stem=cfg.cifar_stem)


def check_name(name: str, cifar_stem: bool = False) -> None:
    """Refuse, in one line, a model.name that names nothing buildable (config validation calls this, before any
    work starts): an unknown name, a torchvision or timm model that does not exist, timm not installed, a module or
    attribute that cannot be found, or model.cifar_stem on a network it does not fit."""
    source, colon, arch = name.partition(":")
    if source == "torchvision":
        check_torchvision(arch, cifar_stem)
        return
    if source == "timm":
        if not _timm(name).is_model(arch):
            raise UserError(f"model.name={spelled(name)}: timm has no model {spelled(arch)}; timm.list_models() "
                            f"lists them")
    else:
        MODELS.check(name)
    if cifar_stem:
        raise UserError(f"model.cifar_stem=true fits torchvision's ResNets (torchvision:resnet18, ...), not "
                        f"model.name={spelled(name)}; set model.cifar_stem=false")


def check_torchvision(arch: str, cifar_stem: bool) -> None:
    import torchvision.models   # here, not at the top: a second of start-up that only torchvision:<name> needs
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"model.name=torchvision:{spelled(arch)}: torchvision.models has no classification model "
                        f"of that name; torchvision.models.list_models(module=torchvision.models) lists them")
    if arch in TORCHVISION_REFUSED:
        raise UserError(f"model.name=torchvision:{arch} {TORCHVISION_REFUSED[arch]}, and CIFAR's are 32x32; choose "
                        f"another network")
    if cifar_stem and not CIFAR_STEM_FAMILY.fullmatch(arch):
        raise UserError(f"model.cifar_stem=true fits torchvision's ResNet family (resnet*, resnext*, "
                        f"wide_resnet*), not torchvision:{arch}; set model.cifar_stem=false")


def torchvision_model(arch: str, num_classes: int, cifar_stem: bool) -> nn.Module:
    """torchvision.models' <arch>, untrained, with num_classes outputs. cifar_stem: a ResNet's 7x7 stride-2 conv
    and max-pool become a 3x3 stride-1 conv and no pool, so that its last stage sees 4x4 maps of a 32x32 image
    rather than 1x1 ones (the CIFAR ResNets' stem, as resnet18's here)."""
    import torchvision.models
    kwargs = dict(TORCHVISION_KWARGS.get(arch, {}))
    if arch.startswith("vit_"):
        kwargs["image_size"] = 32       # position embeddings for a 32x32 image's patches
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _timm(name: str):
    try:
        import timm   # an optional extra: only timm:<name> needs it
    except ImportError:
        raise UserError(f"model.name={spelled(name)} needs timm, an optional extra: pip install -e \".[timm]\"") \
            from None
    return timm


def head(model: nn.Module) -> tuple[str | None, int | None]:
    """(state_dict prefix, number of outputs) of the classifier: the model's last nn.Linear; (None, None) for a
    network without one (torchvision's squeezenet ends in a conv)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None, None
    name, layer = linears[-1]
    return name, layer.out_features


class TutorialNet(nn.Module):
    """The 60-minute tutorial's Net, layer for layer (so its state_dict keys match the tutorial's)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem and no max-pool, so the last stage still sees 4x4 maps."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


register("tutorial_net")(TutorialNet)
register("resnet18")(ResNet18)


# ----------------------------------------------------------------------------- the fast path

class FastBatchNorm(nn.BatchNorm2d):
    """BN for short runs: running stats follow the batch quickly, no learned scale (only the shift)."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad = False


class FastBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = FastBatchNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = FastBatchNorm(cout)
        for conv in (self.conv1, self.conv2):     # start each conv as (part) identity: a shallow net at step 0
            nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastNet(nn.Module):
    """A ~2M-parameter network built for time-to-94% (the airbench family's design, our code): a frozen 2x2
    patch-whitening conv, three conv-pool-BN-GELU blocks and a scaled linear head. `init_from_data` sets the
    whitening filters from training images before training."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths=(64, 256, 256), head_scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad = False
        blocks, cin = [], 24
        for w in widths:
            blocks.append(FastBlock(cin, w))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the eigenvectors of the 2x2-patch covariance of (normalised) images: each
        eigen-direction scaled to unit variance, in both signs (GELU keeps only one side of each)."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)            # N, 3, 31, 31, 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).float().view(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.blocks(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.head_scale


register("fastnet")(FastNet)


def expiring_parameters(cfg, model: nn.Module, steps_per_epoch: int) -> dict:
    """Parameters the model config trains for the first steps only, with the optimizer step at which each stops
    (cfg: the ModelConfig; validation allows whiten_bias_epochs on fastnet only)."""
    if cfg.whiten_bias_epochs is None:
        return {}
    return {model.whiten.bias: cfg.whiten_bias_epochs * steps_per_epoch}


def train_only_until(expiring: dict, step: int) -> None:
    """Freeze each expiring parameter from its step on. Frozen, it gets no gradient (the optimizer skips it, its
    lr has reached 0 anyway) and autograd skips the backward pass below it."""
    for p, until in expiring.items():
        p.requires_grad_(step < until)
