"""`python -m cifar.export`: a trained network in a file that other code loads without this package.

    python -m cifar.export --checkpoint runs/<run> --format tutorial   # cifar_net.pth, for the tutorial's notebook
    python -m cifar.export --checkpoint runs/<run> --format pt2        # model.pt2, for deployment

tutorial: the state_dict as the tutorial saves it, torch.save(net.state_dict(), PATH); its notebook loads it with
    net.load_state_dict(torch.load(PATH, weights_only=True)). Its keys are the tutorial's Net's, so only
    model.name=tutorial_net; the notebook normalises with its own transforms, which fit data.normalize=tutorial.
pt2: a torch.export program (torch.export.save), PyTorch 2's format for deployment (TorchScript is deprecated): the
    network and the run's normalisation in one file that torch alone runs, no Python class needed:
    torch.export.load(PATH).module()(images), images float32 (N, 3, 32, 32) RGB in [0, 1] -> logits (N, classes):
    10 for CIFAR-10, 100 for CIFAR-100 (the class names are in the file's cifar.json).
"""
from __future__ import annotations

import argparse
import io
import json
import os

import torch

from .data import STATS, class_names, dataset_info
from .errors import UserError, cli, warn
from .files import refuse_non_file, state_dict_bytes, write_atomic
from .run_folder import is_state_dict_file
from .trained import add_run_arguments, bare_state_dict_note, load_trained

FORMATS = {"tutorial": "cifar_net.pth", "pt2": "model.pt2"}   # and the file each writes by default
METADATA = "cifar.json"   # inside a .pt2: classes, input, normalisation (torch.export.load(..., extra_files=...))


class Normalized(torch.nn.Module):
    """The network behind its input normalisation, so the exported program takes plain [0, 1] pixels and cannot
    be fed the wrong statistics. Same float32 operations as data.normalize after its / 255."""

    def __init__(self, net: torch.nn.Module, stats: str):
        super().__init__()
        mean, std = STATS[stats]
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images):
        return self.net((images - self.mean) / self.std)


def program_bytes(model: torch.nn.Module, stats: str, metadata: dict) -> bytes:
    """The model (eval mode, CPU, float32) with its normalisation as a torch.export program, any batch size."""
    wrapped = Normalized(model.float().cpu().eval(), stats).eval()
    example = torch.rand(2, 3, 32, 32)
    program = torch.export.export(wrapped, (example,), dynamic_shapes={"images": {0: torch.export.Dim.DYNAMIC}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def export(checkpoint: str, fmt: str, output: str | None, overrides: list[str], pick: str = "auto") -> str:
    """Write the run's weights in `fmt` (beside them unless `output` says where); the path written."""
    cfg, model, weights = load_trained(checkpoint, overrides, pick)
    if is_state_dict_file(weights):
        print(bare_state_dict_note(cfg, weights))
    path = os.path.abspath(output or os.path.join(os.path.dirname(weights), FORMATS[fmt]))
    if path == weights:
        raise UserError(f"the export would overwrite its input {weights}; pass --output with another path")
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; pass a file path, e.g. {os.path.join(path, FORMATS[fmt])}")
    refuse_non_file(path)   # a device or a FIFO: refused before the work, not after it
    if fmt == "tutorial":
        if cfg.model.name != "tutorial_net":
            raise UserError(f"--format tutorial writes weights for the tutorial's Net, and this run is model "
                            f"{cfg.model.name}; use --format pt2, which needs no Python class to load")
        if cfg.data.dataset != "cifar10":
            info = dataset_info(cfg.data)
            raise UserError(f"--format tutorial writes the tutorial's Net, which has 10 outputs (CIFAR-10), and "
                            f"this run is {info.title} ({info.num_classes} classes); use --format pt2, which "
                            f"holds any head and the class names")
        if cfg.data.normalize != "tutorial":
            # the weights load (the keys match), but the notebook's Normalize((0.5, ...)) scales inputs otherwise
            mean, std = STATS[cfg.data.normalize]
            warn(f"this run was trained with data.normalize={cfg.data.normalize}; in the tutorial's code, feed it "
                 f"transforms.Normalize({mean}, {std}) instead of its (0.5, 0.5, 0.5) ones, or it scores lower; "
                 f"or retrain with data.normalize=tutorial")
        data = state_dict_bytes(model)
        how = f"net = Net(); net.load_state_dict(torch.load({path!r}, weights_only=True))"
    else:
        classes = class_names(cfg.data)
        data = program_bytes(model, cfg.data.normalize,
                             {"classes": list(classes), "model": cfg.model.name, "normalize": cfg.data.normalize,
                              "dataset": cfg.data.dataset, "input": "float32 (N, 3, 32, 32) RGB in [0, 1]",
                              "output": f"logits (N, {len(classes)})"})
        how = f"net = torch.export.load({path!r}).module(); logits = net(images)"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, data)
    print(f"wrote {path}\nload it with: {how}")
    return path


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cifar.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="tutorial: cifar_net.pth for the tutorial's code; pt2: a torch.export program")
    parser.add_argument("--output", help="the file to write (default: beside the weights, cifar_net.pth or "
                                         "model.pt2)")
    args, overrides = parser.parse_known_args(argv)
    export(args.checkpoint, args.format, args.output, overrides, args.pick)


if __name__ == "__main__":
    main()
