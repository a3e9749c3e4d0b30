"""Run by the RNG-resume tests instead of train.py (alone or under `accelerate launch`): registers the test-only
dropout_net, then is train.py. Not a test itself."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dropout_model  # noqa: E402,F401  (registers dropout_net; this file's folder is on sys.path)
import train  # noqa: E402
from cifar.errors import exit_as_command  # noqa: E402

if __name__ == "__main__":
    exit_as_command(train.main)
