"""Recipes, overrides and the one-line refusals of bad input (exit code 2, the key named, no traceback)."""
import pytest
import yaml
from conftest import ROOT, run
from inprocess import call, refusal

from cifar.config import Config, config_from_dict, load_config, load_saved_config, parse_overrides
from cifar.errors import UserError


def test_defaults_are_the_tutorial():
    cfg = load_config(None, [])
    t = load_config("configs/tutorial.yaml", [])
    assert (t.model.name, t.data.batch_size, t.optim.lr, t.optim.momentum, t.train.epochs, t.data.augment) == \
        ("tutorial_net", 4, 0.001, 0.9, 2, False)
    assert (cfg.model.name, cfg.data.batch_size, cfg.optim.lr, cfg.train.epochs) == ("tutorial_net", 4, 0.001, 2)
    # the tutorial's Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), with and without the recipe, and in debug.yaml
    assert cfg.data.normalize == t.data.normalize == load_config("configs/debug.yaml").data.normalize == "tutorial"


def test_the_other_recipes_keep_the_cifar_statistics():
    """fast94 and resnet18 were tuned and measured with CIFAR's per-channel mean/std: they say so explicitly, so
    the tutorial default does not change them."""
    for recipe in ("fast94", "resnet18"):
        assert load_config(f"configs/{recipe}.yaml").data.normalize == "cifar"
        assert "normalize: cifar" in open(f"configs/{recipe}.yaml").read()


def test_a_saved_config_without_normalize_was_trained_with_the_cifar_statistics(tmp_path):
    """config.yaml of a run from before data.normalize existed: read back (evaluate, predict, export) as what the
    run used, cifar, not today's default; a saved value, or an override, still wins."""
    saved = load_config("configs/debug.yaml").to_dict()
    del saved["data"]["normalize"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    assert load_saved_config(str(tmp_path / "old.yaml")).data.normalize == "cifar"
    assert config_from_dict(saved).data.normalize == "cifar"
    assert load_saved_config(str(tmp_path / "old.yaml"), ["data.normalize=tutorial"]).data.normalize == "tutorial"
    (tmp_path / "new.yaml").write_text(load_config("configs/debug.yaml").to_yaml())
    assert load_saved_config(str(tmp_path / "new.yaml")).data.normalize == "tutorial"


def test_base_recipe_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\noptim: {lr: 0.5, momentum: 0.8}\ndata: {batch_size: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nname: child\noptim: {lr: 0.25}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["data.batch_size=9", "--train.epochs", "3",
                                                      "--train.mixed_precision=bf16", "schedule.name=cosine"])
    assert cfg.name == "child"
    assert cfg.optim.lr == 0.25 and cfg.optim.momentum == 0.8     # merged, not replaced
    assert cfg.data.batch_size == 9 and cfg.train.epochs == 3
    assert cfg.train.mixed_precision == "bf16" and cfg.schedule.name == "cosine"
    assert isinstance(cfg, Config)


def test_exponents_without_a_dot_are_numbers():
    assert load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-4"]).optim.lr == 0.001


def test_yaml_no_stays_the_string_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_override_values_are_yaml():
    assert parse_overrides(["a.b=0.1", "c=null", "d=[1, 2]", "e=true", "f=text"]) == \
        [("a.b", 0.1), ("c", None), ("d", [1, 2]), ("e", True), ("f", "text")]


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("bogus=1", "bogus"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=fast", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=2.5", "data.batch_size"),
    ("model.name=vgg99", "model.name"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("optim.name=lion", "optim.name"),
    ("schedule.name=step", "schedule.name"),
    ("data.augment=maybe", "data.augment"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.label_smoothing=1.5", "train.label_smoothing"),
    ("data.source=imagenet", "data.source"),
    ("data.pad_mode=mirror", "data.pad_mode"),
    ("train.compile_mode=turbo", "train.compile_mode"),
    ("model.whiten_bias_epochs=3", "model.whiten_bias_epochs"),      # the debug recipe's net has no whitening
    ("optim=3", "optim"),
    ("optim.lr=1e300", "optim.lr"),                  # finite in Python, inf in the float32 update
    ("optim.lr=1e309", "optim.lr"),                  # YAML reads a string, float() makes it inf
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.target_acc=-.inf", "train.target_acc"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config("configs/debug.yaml", [override])


@pytest.mark.parametrize("args, needle", [
    (["optim.lr=0"], "optim.lr"),
    (["optim.lrr=0.1"], "optim.lrr"),
    (["model.name=vgg99"], "model.name"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["data.batch_size=0"], "data.batch_size"),
    (["--config", "configs/nope.yaml"], "nope.yaml"),
    (["train.mixed_precision=fp16"], "fp16"),         # no GPU here: refused before any work
])
def test_cli_refuses_bad_input_with_one_line_and_exit_2(tmp_path, capsys, args, needle):
    if args[0] != "--config":
        args = ["--config", "configs/debug.yaml", *args]
    line = refusal(capsys, "train.py", *args, f"output_dir={tmp_path}/r")
    assert needle in line, line
    assert not (tmp_path / "r").exists()               # refused before the run folder was made


@pytest.mark.slow
def test_the_command_line_refuses_bad_input_with_one_line_and_exit_2(tmp_path):
    """The process itself (what in-process calls cannot see: the exit status the shell gets, and nothing else on
    stderr, no warning from an import): `python train.py` with a bad override."""
    proc = run("train.py", "--config", "configs/debug.yaml", "optim.lr=0", f"output_dir={tmp_path}/r", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: config key 'optim.lr' must be > 0; got 0.0\n" and proc.stdout == ""


def test_bad_yaml_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    line = refusal(capsys, "train.py", "--config", bad)
    assert "not valid YAML" in line and str(bad) in line, line


def test_missing_dataset_names_the_folder(tmp_path, capsys):
    root = tmp_path / "nowhere"
    line = refusal(capsys, "train.py", "--config", "configs/tutorial.yaml", f"data.root={root}",
                   "data.download=false", f"output_dir={tmp_path}/r")
    assert str(root / "cifar-10-batches-py") in line and "data.root" in line and "data.download=true" in line, line


def test_config_that_is_a_folder_or_not_readable_is_one_line(tmp_path, capsys):
    """--config naming a folder, a binary file, or a file that cannot be opened: one line each, exit 2."""
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "loops"
    folder.mkdir()
    looped = folder / "loop.yaml"
    looped.symlink_to(looped)                        # ELOOP: unreadable even for root, unlike chmod 000
    for path, needle in [("configs", "is a folder"), (binary, r"not a text \(YAML\) file"),
                         (looped, "cannot read config file")]:
        with pytest.raises(UserError, match=needle):
            load_config(str(path), [])
    line = refusal(capsys, "train.py", "--config", "configs")
    assert "configs is a folder" in line, line


# ----------------------------------------------------------------------------- --help and --print-config

def all_fields(cls=Config, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from all_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", getattr(cls(), f.name)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_lists_every_config_key_with_type_default_and_comment(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")          # argparse wraps to the terminal; a pipe's width, as in a shell script
    with pytest.raises(SystemExit) as exit_:
        call(script, "--help")
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and err == "", err
    fields = list(all_fields())
    assert len(fields) > 50
    for key, default in fields:
        line = next((line for line in out.splitlines() if line.strip().startswith(f"{key} (")), None)
        assert line is not None, f"{key} missing from {script} --help"
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else \
            "[]" if default == [] else str(default)
        assert line.rstrip().endswith(f"default {shown})"), line
    # types and the dataclass comments (a trailing one, a continued one, one above the field)
    assert "optim.name (sgd | adamw | muon, default sgd)" in out and "data.limit_train (int or null" in out
    assert "per process; default max(batch_size, 256)" in out
    assert "its earlier files are moved into" in out.replace("\n        ", " ")
    assert "train the whitening conv's bias for the first N epochs only" in out


def test_print_config_prints_the_resolved_yaml_and_touches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call("train.py", "--config", f"{ROOT}/configs/debug.yaml", "optim.lr=0.3", "--train.epochs", "7",
         "--print-config")
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    expected = load_config(f"{ROOT}/configs/debug.yaml", ["optim.lr=0.3", "train.epochs=7"]).to_dict()
    assert printed == expected and err == ""
    assert (printed["optim"]["lr"], printed["train"]["epochs"]) == (0.3, 7)     # the overrides, not the recipe's
    assert list(tmp_path.iterdir()) == []        # no runs/, no data/, no lock: nothing was touched


def test_print_config_with_a_bad_override_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert refusal(capsys, "train.py", "--print-config", "optim.lr=-1") == \
        "error: config key 'optim.lr' must be > 0; got -1.0"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, words", [("train.ema.decay=1", "'train.ema.decay' must be in (0, 1)"),
                                             ("train.ema.decay=0", "'train.ema.decay' must be in (0, 1)"),
                                             ("train.ema.every_steps=0", "'train.ema.every_steps' must be >= 1"),
                                             ("train.ema.rate=0.9", "unknown config key 'train.ema.rate'")])
def test_ema_settings_are_checked(override, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("override, line", [
    ("optim.lr=1e309", "error: config key 'optim.lr' must be a finite number of magnitude at most 3.4e38 (float32's "
                       "largest); got inf"),
    ("seed=-1", "error: config key 'seed' must be in 0..4294967295 (for a random seed, pick one: seed=$RANDOM; the "
                "record then holds it); got -1"),
])
def test_an_overflowing_float_or_a_seed_out_of_range_is_one_line_exit_2(capsys, override, line):
    """Every float key is a finite float32 (1e300 or 1e309 would be inf in the first update); seeds are numpy's,
    0 .. 2**32 - 1 (-1, often meaning "random", is refused: the record must hold the seed really used)."""
    assert refusal(capsys, "train.py", "--print-config", override) == line
    assert load_config(None, ["seed=4294967295"]).seed == 2 ** 32 - 1
