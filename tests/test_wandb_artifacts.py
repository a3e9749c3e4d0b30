"""wandb.log_model: checkpoints and final weights as W&B model artifacts, from real offline training runs read back
with `wandb leet inspect --json` (an `artifact` record per logged version: name, type, aliases, metadata and a
manifest whose entries give each file's path, size, MD5 digest (base64) and the staged copy's local_path)."""
import base64
import hashlib
import json
import os

import pytest
from conftest import read_json, run, weights
from test_tracking import history, leet
from test_wandb_training import runs_in, wandb_env

from cifar.tracking import stage_in

TINY = ["--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=128", "train.epochs=2"]


def model_artifacts(run_dir) -> list[dict]:
    """The model artifact versions the run logged, in order."""
    return [r["artifact"] for r in leet(run_dir) if r["type"] == "artifact" and r["artifact"]["type"] == "model"]


def entry(artifact, path) -> dict:
    (found,) = [c for c in artifact["manifest"]["contents"] if c["path"] == path]
    return found


def md5_b64(path) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(hashlib.md5(f.read()).digest()).decode()


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_holds_checkpoint_weights(artifact, checkpoint):
    """The artifact's model.safetensors is the checkpoint's, by the checkpoint's own manifest (size, SHA-256)."""
    saved = read_json(os.path.join(checkpoint, "manifest.json"))["files"]["model.safetensors"]
    e = entry(artifact, "model.safetensors")
    assert int(e["size"]) == saved["size"]
    assert e["digest"] == md5_b64(os.path.join(checkpoint, "model.safetensors"))
    assert sha256_of(e["local_path"]) == saved["sha256"]          # the staged copy wandb uploads on sync


def best_checkpoint(out) -> str:
    folder = out / "checkpoints"
    return str(folder / (folder / "best").read_text().strip())


@pytest.mark.slow
def test_log_model_best_logs_the_best_checkpoint_with_its_alias(tmp_path):
    out = tmp_path / "r"
    proc = run("train.py", *TINY, f"output_dir={out}", "wandb.log_model=best", **wandb_env(tmp_path))
    assert "warning: W&B" not in proc.stderr
    (run_dir,) = runs_in(out)
    run_id = leet(run_dir, summary=True)["run_id"]
    versions = model_artifacts(run_dir)
    assert versions and all(a["name"] == f"model-{run_id}" and "best" in a["aliases"] for a in versions)
    assert not any("final" in a["aliases"] for a in versions)
    best = best_checkpoint(out)
    last = versions[-1]
    meta = json.loads(last["metadata"])
    assert meta["checkpoint"] == os.path.basename(best) and meta["test_acc"] == read_json(out / "summary.json")[
        "best_test_acc"]
    assert {c["path"] for c in last["manifest"]["contents"]} >= {"model.safetensors", "training.pt", "state.json",
                                                                   "config.yaml", "manifest.json"}
    assert_holds_checkpoint_weights(last, best)
    # the user's WANDB_DATA_DIR (wandb_env sets one) wins over staging in the run folder
    assert all(c["local_path"].startswith(str(tmp_path / "home" / "data")) for c in last["manifest"]["contents"])


def test_staging_goes_into_the_run_folder_unless_the_user_chose_a_folder(tmp_path):
    environ = {"WANDB_DATA_DIR": "/mine", "WANDB_CACHE_DIR": ""}
    staged = stage_in(str(tmp_path), environ)
    assert staged == {"WANDB_CACHE_DIR": str(tmp_path / "wandb" / "cache"),
                      "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb" / "artifacts")}
    assert environ == {"WANDB_DATA_DIR": "/mine", **staged}


@pytest.mark.slow
def test_log_model_all_logs_every_checkpoint_and_the_final_weights(tmp_path):
    """With train.ema the average goes along: in each checkpoint folder and beside the final weights."""
    out = tmp_path / "r"
    run("train.py", *TINY, f"output_dir={out}", "wandb.log_model=all", "train.ema.decay=0.9", **wandb_env(tmp_path))
    (run_dir,) = runs_in(out)
    versions = model_artifacts(run_dir)
    *checkpoints, final = versions
    assert [json.loads(a["metadata"])["step"] for a in checkpoints] == [8, 16]     # one save per epoch
    assert all(f"step-{json.loads(a['metadata'])['step']}" in a["aliases"] for a in checkpoints)
    best = os.path.basename(best_checkpoint(out))
    bests = [a for a in checkpoints if "best" in a["aliases"]]
    assert bests and best in bests[-1]["aliases"]                 # the version aliased best last: the best pointer
    assert_holds_checkpoint_weights(checkpoints[-1], str(out / "checkpoints" / "step-16"))
    assert "final" in final["aliases"] and json.loads(final["metadata"])["kind"] == "final"
    e = entry(final, "model.safetensors")
    assert int(e["size"]) == os.path.getsize(out / "model.safetensors")
    assert e["digest"] == md5_b64(out / "model.safetensors")
    assert {c["path"] for c in final["manifest"]["contents"]} == {"model.safetensors", "model-ema.safetensors",
                                                                   "config.yaml", "summary.json"}   # train.ema
    assert entry(final, "model-ema.safetensors")["digest"] == md5_b64(out / "model-ema.safetensors")
    assert "model-ema.safetensors" in {c["path"] for c in checkpoints[-1]["manifest"]["contents"]}


@pytest.mark.slow
def test_log_model_final_logs_the_final_weights_only(tmp_path):
    """wandb.log_model=final: one model artifact version, aliased final, holding the final weights (size and MD5 of
    the run folder's model.safetensors), the config and summary; no checkpoint is logged."""
    out = tmp_path / "r"
    proc = run("train.py", *TINY, f"output_dir={out}", "wandb.log_model=final", **wandb_env(tmp_path))
    assert "warning: W&B" not in proc.stderr
    (run_dir,) = runs_in(out)
    run_id = leet(run_dir, summary=True)["run_id"]
    (final,) = model_artifacts(run_dir)
    assert final["name"] == f"model-{run_id}" and "final" in final["aliases"]
    assert not [a for a in final["aliases"] if a.startswith("step-") or a == "best"], final["aliases"]
    meta = json.loads(final["metadata"])
    assert meta["kind"] == "final" and meta["step"] == read_json(out / "summary.json")["steps"]
    assert {c["path"] for c in final["manifest"]["contents"]} == {"model.safetensors", "config.yaml", "summary.json"}
    e = entry(final, "model.safetensors")
    assert int(e["size"]) == os.path.getsize(out / "model.safetensors")
    assert e["digest"] == md5_b64(out / "model.safetensors")


@pytest.mark.slow
def test_failing_artifacts_warn_once_and_change_nothing_else(tmp_path):
    """Two real failures: W&B refusing the model upload (log_artifact raises: artifacts stop, one warning, metrics
    go on) and an unusable staging folder (a file as $WANDB_DATA_DIR: the samples tables fail first and W&B turns
    off, one warning). Both runs finish, exit 0, with the weights of a run without log_model, bit for bit."""
    plain = tmp_path / "plain"
    run("train.py", *TINY, f"output_dir={plain}", "wandb.log_model=false", **wandb_env(tmp_path / "p"))
    assert not model_artifacts(runs_in(plain)[0])

    refused = tmp_path / "refused"
    proc = run("tests/upload_failing_train.py", *TINY, f"output_dir={refused}", "wandb.log_model=all",
               **wandb_env(tmp_path / "f"))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B log_model failed, continuing without model "
                                                         "artifacts (metrics are still logged): CommError: upload "
                                                         "refused"), proc.stderr[-2000:]
    (run_dir,) = runs_in(refused)
    assert not model_artifacts(run_dir)
    assert [r["global_step"] for r in history(run_dir) if "test/acc" in r] == [8, 16]     # after the failure too
    assert leet(run_dir, summary=True)["summary"]["final_test_acc"] == read_json(refused / "summary.json")[
        "final_test_acc"]

    blocker = tmp_path / "data-is-a-file"
    blocker.write_text("not a folder")
    staging = tmp_path / "staging"
    env = wandb_env(tmp_path / "s")
    env["WANDB_DATA_DIR"] = str(blocker)
    proc = run("train.py", *TINY, f"output_dir={staging}", "wandb.log_model=all", **env)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "Unable to write staging files" in warnings[0], proc.stderr[-2000:]

    for out in (refused, staging):
        assert proc.returncode == 0 and read_json(out / "status.json")["state"] == "finished"
        a, b = weights(plain), weights(out)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_log_model_reads_a_bare_yaml_false_and_refuses_best_without_a_kept_best(tmp_path):
    from cifar.config import load_config
    from cifar.errors import UserError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: " + os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                              "debug.yaml") + "\nwandb: {log_model: false}\ntrain: {mixed_precision: no}\n")
    cfg = load_config(str(recipe))
    assert cfg.wandb.log_model == "false" and cfg.train.mixed_precision == "no"
    assert load_config(None).wandb.log_model == "false"
    assert load_config(str(recipe), ["wandb.log_model=best"]).wandb.log_model == "best"
    with pytest.raises(UserError, match="wandb.log_model"):
        load_config(str(recipe), ["wandb.log_model=best", "checkpoint.keep_best=0"])
    with pytest.raises(UserError, match="wandb.log_model"):
        load_config(str(recipe), ["wandb.log_model=true"])
