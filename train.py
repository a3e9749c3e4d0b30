"""Train a CIFAR-10 classifier.

    python train.py [--config configs/RECIPE.yaml] [section.key=value ...]
    python train.py --config configs/resnet18.yaml optim.lr=0.2 --print-config   # the resolved config, then exit
    accelerate launch --multi_gpu --num_processes 4 train.py --config configs/resnet18.yaml optim.lr=0.2

With no --config the defaults are the PyTorch 60-minute tutorial (configs/tutorial.yaml).
"""
import argparse

import os

from cifar import log, precedence
from cifar.config import load_config
from cifar.config_help import help_text
from cifar.engine import train
from cifar.errors import cli, exit_as_command


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, epilog=help_text(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the tutorial recipe)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe + overrides) as YAML and exit; touches no data or folder")
    parser.add_argument("--log-level", choices=log.LEVELS,
                        help="debug | info (default) | warning | error; or $CIFAR_LOG_LEVEL (cifar/log.py)")
    args, overrides = parser.parse_known_args(argv)
    log.setup(args.log_level)
    cfg = load_config(args.config, overrides)
    # the launcher's and W&B's variables, under train.py's own keys (cifar/precedence.py); every rank resolves the
    # same, the first says what lost
    cfg, notes = precedence.resolve(cfg, precedence.given_keys(overrides), os.environ)
    for note in notes if os.environ.get("RANK", "0") == "0" else ():
        log.warning(note)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    train(cfg)


if __name__ == "__main__":
    exit_as_command(main)
