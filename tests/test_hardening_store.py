"""The store never deletes or writes outside its directory, and its index survives concurrent edits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import assert_one_error_line, invoke

from influence_core import artifacts
from influence_core.api import open_source
from influence_core.errors import InfluenceError, ModelNotFoundError
from influence_core.hf_directory import write_hf_directory
from influence_models import store


@pytest.fixture
def victim(tmp_path):
    """A directory of the user's, next to the store, that no store command may touch."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_model):
    """INFLUENCE_HOME with one model the store made (a conversion) and one placed by hand."""
    home = tmp_path / "home"
    monkeypatch.setenv("INFLUENCE_HOME", str(home))
    write_hf_directory(open_source(tiny_model), store.models_dir() / "made")
    (store.models_dir() / "by-hand").mkdir()
    (store.models_dir() / "by-hand" / "notes.txt").write_text("mine")
    return home


def everything_under(*roots):
    """Every path under each root, but the index's lock file (left in place, as filelock does on POSIX)."""
    return {root: sorted(str(path.relative_to(root)) for path in root.rglob("*") if not path.name.endswith(".lock"))
            for root in roots}


@pytest.mark.parametrize("name", ["VICTIM", "../../victim", "../victim", ".", "", "..", "../models", "./made",
                                  "made/..", "..\\victim", ".made.download", "by-hand"])
def test_rm_refuses_anything_but_an_entry_the_store_made(capsys, home, victim, name):
    name = str(victim) if name == "VICTIM" else name
    before = everything_under(home, victim)
    code, out, err = invoke(capsys, "models", "rm", name)
    assert_one_error_line(code, err, "")
    assert "removed" not in out
    assert everything_under(home, victim) == before


def test_rm_removes_what_the_store_made(capsys, home):
    code, out, err = invoke(capsys, "models", "rm", "made")
    assert code == 0, err
    assert out == f"removed {store.models_dir() / 'made'}\n" and not (store.models_dir() / "made").exists()


def test_an_alias_or_default_cannot_name_a_path(capsys, home, victim):
    before = everything_under(home, victim)
    for args in (["models", "alias", "../../victim", "a"], ["models", "alias", str(victim), "a"],
                 ["models", "alias", "made", "../a"], ["models", "alias", "made", "a\\b"],
                 ["models", "default", str(victim)], ["models", "default", "../../victim"],
                 ["models", "default", "/abs/path"]):
        code, _, err = invoke(capsys, *args)
        assert_one_error_line(code, err, "")
    assert store.read_names() == {"aliases": {}}
    assert everything_under(home, victim) == before


def test_a_hand_edited_index_pointing_outside_the_store_is_refused(capsys, home, victim):
    (home / store.NAMES).write_text(json.dumps({"aliases": {"a": "../../victim"}, "default": "../../victim"}))
    before = everything_under(victim)
    code, _, err = invoke(capsys, "models", "rm", "a")
    assert_one_error_line(code, err, "'../../victim' is not a model name in the store")
    with pytest.raises(ModelNotFoundError, match="is not a model name in the store"):
        store.resolve_default_model()
    assert everything_under(victim) == before


def test_a_link_in_the_store_is_not_followed_out_of_it(capsys, home, victim):
    (victim / artifacts.MANIFEST).write_text(json.dumps({"source": "forged"}))  # even with a manifest
    (store.models_dir() / "linked").symlink_to(victim, target_is_directory=True)
    before = everything_under(victim)
    code, _, err = invoke(capsys, "models", "rm", "linked")
    assert_one_error_line(code, err, "was not made by Influence")
    assert everything_under(victim) == before and (store.models_dir() / "linked").is_symlink()


def test_a_conversion_does_not_replace_a_directory_the_store_did_not_make(home, tiny_model):
    source = open_source(tiny_model)
    with pytest.raises(InfluenceError, match="Influence did not make it"):
        store.convert_into_store(source, "by-hand")
    assert (store.models_dir() / "by-hand" / "notes.txt").read_text() == "mine"
    with pytest.raises(ModelNotFoundError, match="is not a model name"):
        store.convert_into_store(source, "../escaped")


RACER = """
import sys
from influence_models import catalog
for i in range(int(sys.argv[2])):
    catalog.add_alias("made", f"{sys.argv[1]}-{i}")
"""


def test_two_processes_editing_the_index_at_once_lose_nothing(home):
    count = 25
    racers = [subprocess.Popen([sys.executable, "-c", RACER, prefix, str(count)], env={**os.environ},
                               stderr=subprocess.PIPE, text=True) for prefix in ("left", "right")]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read()
    aliases = store.read_names()["aliases"]
    assert sorted(aliases) == sorted(f"{side}-{i}" for side in ("left", "right") for i in range(count))
    assert set(aliases.values()) == {"made"}
    assert not [path.name for path in home.iterdir() if path.name.endswith(".partial")]
