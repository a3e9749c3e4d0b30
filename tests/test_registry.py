"""One way to extend every component (cifar/registry.py): models, optimizers and schedules by name, a torchvision or
timm model, or one's own <module>:<callable>; each trains, evaluates and resumes in this process, and every name
that builds nothing is one line, exit 2, before any work."""
import json
import math
import os
import re
import sys

import pytest
import torch
import yaml
from PIL import Image
from conftest import ROOT, read_json, read_jsonl, weights
from inprocess import entry

from cifar.config import load_config
from cifar.models import MODELS, build_model
from cifar.optim import OPTIMIZERS, build_optimizer
from cifar.registry import Registry
from cifar.schedule import SCHEDULES, lr_factor

# The debug recipe cut to 2 optimizer steps on a few images: what these tests need is a run folder that the model
# was trained, saved, evaluated and checkpointed in, not a trained model.
RUN = ("--config", os.path.join(ROOT, "configs", "debug.yaml"), "train.max_steps=2", "data.batch_size=8",
       "data.limit_train=64", "data.limit_test=40")


train, evaluate = entry("train.py"), entry("evaluate.py")


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """Runs in this process as conftest.run's subprocesses run: offline, on one intra-op thread (OMP_NUM_THREADS=1;
    with -n 2 each worker has a core, and more threads than cores make every op wait for the slowest)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "path", list(sys.path))     # a user's module puts the working directory on it
    # only the package's own entries: another test file of this worker may have registered its own (test_rng_resume's
    # dropout_net), which the exact lists below would otherwise see
    for registry in (MODELS, OPTIMIZERS, SCHEDULES):
        monkeypatch.setattr(registry, "_builders", {name: builder for name, builder in registry._builders.items()
                                                    if builder.__module__.startswith("cifar.")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_exit_2(capsys, main, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def trains_evaluates_and_resumes(out, *names) -> dict:
    """Train 2 steps, evaluate the folder, resume it for a third step: the model.* names as the record keeps
    them, and what evaluate.py said."""
    train([*RUN, *names, f"output_dir={out}"])
    summary = read_json(out / "summary.json")
    evaluate(["--checkpoint", str(out)])
    report = read_json(out / "eval.json")
    config = yaml.safe_load((out / "config.yaml").read_text())
    # evaluate.py rebuilt the network from config.yaml and scored the final weights as training did
    assert report["model"] == config["model"]["name"] and report["count"] == 40
    assert report["accuracy"] == summary["final_test_acc"] and report["loss"] == pytest.approx(
        summary["final_test_loss"], rel=1e-6)
    assert report["accuracy_top5"] == summary["final_test_acc_top5"]
    train([*RUN, *names, f"output_dir={out}", "train.max_steps=3"])
    resumed = read_json(out / "summary.json")
    assert resumed["steps"] == 3 and resumed["resumed_from"].endswith("step-2"), resumed
    return config["model"]


def test_a_torchvision_resnet_trains_evaluates_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    model = trains_evaluates_and_resumes(out, "model.name=torchvision:resnet18")
    assert model["name"] == "torchvision:resnet18" and model["cifar_stem"] is False
    saved = weights(out)
    assert saved["conv1.weight"].shape == (64, 3, 7, 7) and saved["fc.weight"].shape == (10, 512)
    # the stem is part of the model: a resume with the other one is refused before anything is loaded
    err = one_line_exit_2(capsys, train, *RUN, "model.name=torchvision:resnet18", "model.cifar_stem=true",
                          f"output_dir={out}", "train.max_steps=4")
    assert "model.cifar_stem: false -> true" in err


def test_the_cifar_stem_is_a_3x3_stride_1_conv_without_a_pool():
    plain, cifar = (build_model("torchvision:resnet18", 100, cifar_stem=stem) for stem in (False, True))
    assert (plain.conv1.kernel_size, plain.conv1.stride) == ((7, 7), (2, 2))
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, torch.nn.Identity) and not isinstance(plain.maxpool, torch.nn.Identity)
    images = torch.zeros(2, 3, 32, 32)
    assert cifar(images).shape == plain(images).shape == (2, 100)       # the head sized to the classes
    assert build_model("torchvision:shufflenet_v2_x0_5", 10).fc.out_features == 10


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's network file, tiny_user_net.py, in the working directory (tmp_path)."""
    (tmp_path / "tiny_user_net.py").write_text(
        "import torch.nn as nn\n\n\n"
        "def build(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))\n\n\n"
        "def not_a_network(num_classes):\n"
        "    return [num_classes]\n\n\n"
        "WIDTH = 8\n")
    monkeypatch.chdir(tmp_path)
    yield "tiny_user_net"
    sys.modules.pop("tiny_user_net", None)


def test_a_users_module_callable_trains_evaluates_and_resumes(tmp_path, user_module, capsys):
    out = tmp_path / "run"
    model = trains_evaluates_and_resumes(out, f"model.name={user_module}:build")
    assert model["name"] == "tiny_user_net:build"
    assert set(weights(out)) == {"1.weight", "1.bias"}                   # the user's network, not one of ours
    # predict.py rebuilds it from config.yaml too
    Image.new("RGB", (40, 32), (200, 30, 30)).save(tmp_path / "red.png")
    capsys.readouterr()                                  # what training and evaluate.py printed
    entry("predict.py")(["--checkpoint", str(out), str(tmp_path / "red.png"), "--json"])
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["model"] == "tiny_user_net:build" and len(predicted["predictions"][0]["top"]) == 3
    # a resume with another model is refused in one line, naming both
    err = one_line_exit_2(capsys, train, *RUN, "model.name=tutorial_net", f"output_dir={out}", "train.max_steps=4")
    assert "tiny_user_net:build" in err and "tutorial_net" in err
    # a callable that returns something else than a network: one line when the run builds it
    err = one_line_exit_2(capsys, train, *RUN, f"model.name={user_module}:not_a_network",
                          f"output_dir={tmp_path / 'other'}")
    assert "returned a list, not a torch.nn.Module" in err


@pytest.mark.parametrize("override, needle", [
    ("model.name=vgg99", "config key 'model.name' must be one of tutorial_net, resnet18, fastnet, "
                         "torchvision:<name>, timm:<name>, <module>:<callable>; got 'vgg99'"),
    ("model.name=torchvision:resnet19", "torchvision.models has no classification model"),
    ("model.name=torchvision:inception_v3", "needs images of at least 75x75 pixels"),
    ("model.name=no_such_module_here:build", "no module no_such_module_here on the Python path"),
    ("model.name=tiny_user_net:missing", "tiny_user_net ("),
    ("model.name=tiny_user_net:WIDTH", "tiny_user_net.WIDTH is not callable"),
    ("model.name=a:b:c", "must be one of"),
    ("model.cifar_stem=true", "not model.name=tutorial_net"),
    ("model.name=torchvision:vgg11 model.cifar_stem=true", "ResNet family"),
    ("optim.name=lion", "config key 'optim.name' must be one of sgd, adamw, muon, <module>:<callable>; got 'lion'"),
    ("optim.name=tiny_user_net:nope", "optim.name=tiny_user_net:nope: tiny_user_net ("),
    ("schedule.name=step", "config key 'schedule.name' must be one of constant, cosine, onecycle, linear, "
                           "<module>:<callable>; got 'step'"),
])
def test_a_name_that_builds_nothing_is_one_line_and_exit_2(user_module, capsys, override, needle):
    err = one_line_exit_2(capsys, train, *RUN, *override.split(), "--print-config")
    assert needle in err, err


def test_a_missing_timm_is_one_line_naming_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)      # as without the extra, whether or not it is installed
    err = one_line_exit_2(capsys, train, *RUN, "model.name=timm:resnet18", "--print-config")
    assert err == 'error: model.name=timm:resnet18 needs timm, an optional extra: pip install -e ".[timm]"\n'


def test_a_timm_model_trains_and_evaluates(tmp_path):
    pytest.importorskip("timm", reason='timm is an optional extra, not installed here: pip install -e ".[timm]"')
    out = tmp_path / "run"
    train([*RUN, "model.name=timm:resnet18", f"output_dir={out}"])
    evaluate(["--checkpoint", str(out)])
    assert read_json(out / "eval.json")["accuracy"] == read_json(out / "summary.json")["final_test_acc"]


def test_help_lists_what_each_registry_holds(capsys):
    with pytest.raises(SystemExit):
        train(["--help"])
    out = capsys.readouterr().out
    assert "model.name (tutorial_net | resnet18 | fastnet | torchvision:<name> | timm:<name>, default " \
           "tutorial_net)" in out
    assert "optim.name (sgd | adamw | muon, default sgd)" in out
    assert "schedule.name (constant | cosine | onecycle | linear, default constant)" in out
    assert out.count("<module>:<callable>: your own (docs/extending.md)") == 4     # models, optim, schedule, policy
    assert "model.cifar_stem (bool, default false)" in out


def test_a_registered_builder_is_a_name_in_config_help_and_training(monkeypatch, capsys):
    """@REGISTRY.register adds a built-in: the config takes it, --help lists it, the optimizer is built by it."""
    monkeypatch.setattr(OPTIMIZERS, "_builders", dict(OPTIMIZERS._builders))   # the registration ends with the test
    monkeypatch.setattr(OPTIMIZERS, "meta", dict(OPTIMIZERS.meta))

    @OPTIMIZERS.register("rmsprop")
    def rmsprop(groups, cfg):
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)

    cfg = load_config("configs/debug.yaml", ["optim.name=rmsprop", "optim.lr=0.5"])
    optimizer = build_optimizer(cfg.optim, torch.nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.RMSprop) and optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(SystemExit):
        train(["--help"])
    assert "optim.name (sgd | adamw | muon | rmsprop, default sgd)" in capsys.readouterr().out


def test_a_name_registered_twice_is_refused_and_a_colon_is_not_a_name():
    registry = Registry("thing", "thing.name")
    registry.register("a")(len)
    registry.register("a")(len)                           # the same builder again (a module imported twice): fine
    with pytest.raises(ValueError, match="registered already"):
        registry.register("a")(abs)
    with pytest.raises(ValueError, match="no ':'"):
        registry.register("my:thing")
    assert list(registry) == ["a"] and registry.names() == ["a", "<module>:<callable>"]


def test_the_built_ins_are_in_their_registries():
    assert list(MODELS) == ["tutorial_net", "resnet18", "fastnet"]
    assert list(OPTIMIZERS) == ["sgd", "adamw", "muon"]
    assert list(SCHEDULES) == ["constant", "cosine", "onecycle", "linear"]
    assert SCHEDULES.meta["onecycle"] == {"warmup": 0.25}


# ----------------------------------------------------------------------------- docs/extending.md, as tested code

DOC = os.path.join(ROOT, "docs", "extending.md")
EXAMPLE = os.path.join(ROOT, "examples", "my_parts.py")


def test_the_docs_example_is_the_tested_file(tmp_path, monkeypatch):
    """The page shows examples/my_parts.py whole; its own command (cut to 2 steps) trains and evaluates with all
    three of the file's parts, run from the repository as the page says."""
    with open(DOC) as f:
        page = f.read()
    (shown,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "def small_cnn" in b]
    with open(EXAMPLE) as f:
        assert shown == f.read()
    block = re.findall(r"```bash\n(.*?)```", page, re.S)[0].replace("\\\n", " ")
    (command,) = [line for line in block.splitlines() if "train.py" in line]
    args = command.split()[2:]
    assert args[:2] == ["--config", "configs/debug.yaml"]
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    train([*args, *RUN[2:], f"output_dir={out}"])
    evaluate(["--checkpoint", str(out)])
    assert read_json(out / "eval.json")["accuracy"] == read_json(out / "summary.json")["final_test_acc"]
    cfg = load_config("configs/debug.yaml", args[2:])
    net = build_model(cfg.model.name)
    assert [type(m).__name__ for m in net][-1] == "Linear" and "examples.my_parts" in sys.modules
    assert isinstance(build_optimizer(cfg.optim, net), torch.optim.RMSprop)
    # the logged lr follows the user's schedule: after the warmup, 0.02 * 0.01 ** progress
    # (the warmup cut to the first of the 2 steps), the last step at its end, 0.01 of it
    (last,) = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert last["step"] == 2 and last["lr"] == pytest.approx(0.02 * 0.01)
    assert lr_factor(cfg.schedule.name, 9, 20, 4) == pytest.approx(0.01 ** (5 / 15))
    assert math.isclose(lr_factor(cfg.schedule.name, 19, 20, 4), 0.01)
