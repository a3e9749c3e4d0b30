"""`python evaluate.py ...` in a checkout: the same command as `cifar-evaluate` (its work and --help:
cifar/evaluate_cli.py)."""
from cifar.errors import exit_as_command
from cifar.evaluate_cli import main

if __name__ == "__main__":
    exit_as_command(main)
