"""train.py's work (`cifar-train`): its command line (--config, overrides, --print-config) to engine.train."""
import argparse

from . import log, precedence, shipped
from .config import load_config
from .config_help import help_text
from .engine import train
from .errors import cli, exit_as_command

USAGE = """Train a CIFAR-10 or CIFAR-100 classifier.

    cifar-train [--config RECIPE] [section.key=value ...]            # or: python train.py ... in a checkout
    cifar-train --config resnet18 optim.lr=0.2 --print-config        # the resolved config, then exit
    accelerate launch --multi_gpu --num_processes 4 -m cifar.train_cli --config resnet18 optim.lr=0.2

RECIPE is a YAML file, or the name of a recipe shipped in the package (cifar/recipes/: debug, resnet18, ...).
With no --config the defaults are the PyTorch 60-minute tutorial (the tutorial recipe).
"""


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=USAGE, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"a YAML recipe file, or a shipped recipe's name: "
                                          f"{', '.join(shipped.names())} (default: the tutorial's settings)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe + overrides) as YAML and exit; touches no data or "
                             "folder")
    parser.add_argument("--log-level", choices=log.LEVELS,
                        help="debug | info (default) | warning | error; or $CIFAR_LOG_LEVEL (cifar/log.py)")
    args, overrides = parser.parse_known_args(argv)
    log.setup(args.log_level)
    cfg = load_config(args.config, overrides)
    # the launcher's and W&B's variables, under train.py's own keys (cifar/precedence.py); every rank resolves the
    # same, the first says what lost
    cfg = precedence.applied(cfg, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    train(cfg)


def command() -> None:
    """The `cifar-train` console script: main(), then the process exits with its status (a rank of a multi-process
    run without interpreter finalization: errors.exit_as_command)."""
    exit_as_command(main)


if __name__ == "__main__":
    exit_as_command(main)
