"""Hostile input stays bounded: a YAML alias bomb, deep nesting and megabyte values are refused in one short line
(exit 2) wherever YAML is read; a sweep's grid is never expanded beyond the runs asked for; writes replace only
regular files and honour the umask; and every "wrote X" names the file written."""
from __future__ import annotations

import importlib.util
import os
import tracemalloc

import pytest

from cifar import compare, yaml_io
from cifar.config import load_config
from cifar.errors import UserError, shorten
from conftest import ROOT


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': level i lists `width` references to level i - 1, so the last one is width**levels values."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def as_flow(block: str) -> str:
    """The same mapping on one line, as an override value is written."""
    return "{" + ", ".join(block.splitlines()) + "}"


def entry(script: str):
    """The main(argv) of train.py / predict.py, imported as a module (they live beside the package, not in it)."""
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def one_line_exit_2(capsys, main, *argv) -> str:
    """Run an entry point in-process; it must exit 2 with one short `error:` line on stderr. Returns the line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 300, err[:1000]
    return err


def peak_bytes(call) -> int:
    """Peak Python memory allocated while `call` runs (tracemalloc), whatever it raises."""
    tracemalloc.start()
    try:
        call()
    except (UserError, SystemExit):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ----------------------------------------------------------------------------- YAML

def test_the_bomb_is_what_it_claims():
    """The refused document really is the billion laughs: nine levels of nine, 387 million values, in 0.2 KB."""
    bomb = alias_bomb()
    assert len(bomb) < 2048 and 9 ** 9 > 3 * 10 ** 8
    assert yaml_io.safe_load(alias_bomb(levels=2), "a small one")["a1"] == [["lol"] * 9] * 9   # aliases still work


def test_alias_bomb_as_an_override_is_one_line(capsys):
    train = entry("train.py")
    err = one_line_exit_2(capsys, train, f"optim.lr={as_flow(alias_bomb())}", "--print-config")
    assert "override 'optim.lr' expands to more than 100,000 values" in err
    assert peak_bytes(lambda: train([f"optim.lr={as_flow(alias_bomb())}", "--print-config"])) < 20 << 20


def test_alias_bomb_as_a_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    err = one_line_exit_2(capsys, entry("train.py"), "--config", str(recipe), "--print-config")
    assert f"config file {recipe} expands to more than 100,000 values" in err
    assert peak_bytes(lambda: load_config(str(recipe))) < 20 << 20


def test_alias_bomb_as_a_run_folders_config_is_one_line_in_compare(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(alias_bomb())
    err = one_line_exit_2(capsys, compare.main, str(tmp_path / "run"))
    assert f"{tmp_path / 'run' / 'config.yaml'} expands to more than 100,000 values" in err
    assert peak_bytes(lambda: compare.main([str(tmp_path / "run")])) < 20 << 20


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000, "&a [*a]"],
                         ids=["lists", "mappings", "itself"])
def test_deep_nesting_is_one_line(value, capsys):
    err = one_line_exit_2(capsys, entry("train.py"), f"optim.lr={value}", "--print-config")
    assert "override 'optim.lr' nests deeper than 100 levels" in err


def test_a_key_of_thousands_of_parts_is_one_line(capsys):
    err = one_line_exit_2(capsys, entry("train.py"), ".".join(["optim"] * 5000) + "=1", "--print-config")
    assert "has 5,000 parts" in err


def test_text_is_capped_before_parsing(tmp_path, capsys):
    train = entry("train.py")
    err = one_line_exit_2(capsys, train, "wandb.notes=" + "x" * (yaml_io.VALUE_CHARS + 1), "--print-config")
    assert "override 'wandb.notes' is longer than 65,536 characters" in err
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "# padding\n" * (yaml_io.FILE_CHARS // 10))
    err = one_line_exit_2(capsys, train, "--config", str(big), "--print-config")
    assert f"config file {big} is longer than 1,048,576 characters" in err


def test_nesting_and_size_within_the_limits_still_read():
    deep = "[" * yaml_io.MAX_DEPTH + "]" * yaml_io.MAX_DEPTH
    assert yaml_io.safe_load(deep, "x") is not None
    with pytest.raises(UserError, match="nests deeper"):
        yaml_io.safe_load("[" + deep + "]", "x")
    assert len(yaml_io.safe_load("[" + "1, " * (yaml_io.MAX_NODES - 2) + "1]", "x")) == yaml_io.MAX_NODES - 1


def test_a_value_yaml_cannot_construct_is_one_line(capsys):
    err = one_line_exit_2(capsys, entry("train.py"), "optim.lr=" + "1" * 5000, "--print-config")
    assert "override 'optim.lr' holds a value YAML cannot read" in err


# ----------------------------------------------------------------------------- messages

def test_shorten_cuts_long_values_and_says_how_long():
    assert shorten("abc") == "'abc'" and shorten([1, {"a": (2,)}]) == "[1, {'a': (2,)}]" and shorten(0.5) == "0.5"
    text = shorten("x" * 10 ** 6)
    assert text.endswith("... (1,000,000 characters)") and len(text) < 120
    assert shorten(list(range(10 ** 6))).endswith("... (1,000,000 items)")


@pytest.mark.parametrize("override", ["optim.lr=", "optim.name=", "train.compile=", "data.batch_size=",
                                      "model.name=", "data.limit_train=", "x" * 100 + "="])
def test_a_megabyte_value_makes_a_short_message(override, capsys):
    """Every refusal that repeats the value cuts it: a 60,000-character string (under the override cap) and a
    100,000-item list (under the node cap)."""
    train = entry("train.py")
    for value in ("v" * 60_000, "[" + "1, " * 99_000 + "1]"):
        one_line_exit_2(capsys, train, override + value, "--print-config")
