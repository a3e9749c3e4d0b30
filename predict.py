"""`python predict.py ...` in a checkout: the same command as `cifar-predict` (its work and --help:
cifar/predict_cli.py)."""
from cifar.errors import exit_as_command
from cifar.predict_cli import main

if __name__ == "__main__":
    exit_as_command(main)
