"""`python train.py ...` in a checkout: the same command as `cifar-train` (its work and --help:
cifar/train_cli.py)."""
from cifar.errors import exit_as_command
from cifar.train_cli import main

if __name__ == "__main__":
    exit_as_command(main)
