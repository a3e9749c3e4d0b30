"""Run by the log_model tests instead of train.py: wandb's Run.log_artifact raises for model artifacts, as it does
when W&B refuses an upload (wandb.errors.CommError), while tables and metrics keep working. Not a test itself."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wandb  # noqa: E402
from wandb.sdk.wandb_run import Run  # noqa: E402

import train  # noqa: E402
from cifar.errors import exit_as_command  # noqa: E402

_log_artifact = Run.log_artifact


def failing_log_artifact(self, artifact_or_path, *args, **kwargs):
    if getattr(artifact_or_path, "type", None) == "model":
        raise wandb.errors.CommError("upload refused (tests/upload_failing_train.py)")
    return _log_artifact(self, artifact_or_path, *args, **kwargs)


Run.log_artifact = failing_log_artifact

if __name__ == "__main__":
    exit_as_command(train.main)
