"""Exports never mix with or overwrite another model's files, never destroy a run's own files, and are
never half written; a doomed export is refused before anything is built (issue 24, items 1, 2, 7)."""

import hashlib
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fipo_jax.models import (EXPORT_MARKER, CausalLM, ExportFolderError, ModelConfig, check_export_folder,
                             load_pretrained, save_pretrained)
from fipo_jax.models import hf_io
from fipo_jax.train.run_dir import ExportDestinationError, check_export_destination

from fipo_jax.train import cli as train_cli

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, initializer_range=0.2)


def model(seed: int) -> CausalLM:
    return CausalLM(CONFIG, rngs=nnx.Rngs(seed))


def snapshot(folder) -> dict[str, str]:
    """File name → sha256 of every file in ``folder``."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))}


def same_weights(a: CausalLM, b: CausalLM) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))))


@pytest.fixture
def base(tmp_path):
    """Another model's sharded checkpoint (not an export of ours: no marker)."""
    folder = tmp_path / "base"
    save_pretrained(model(0), folder, max_shard_bytes=20_000)
    os.remove(folder / EXPORT_MARKER)  # as a checkpoint from elsewhere would be
    assert (folder / "model.safetensors.index.json").exists()
    return folder


def test_an_export_into_another_models_folder_is_refused_and_touches_nothing(base):
    before = snapshot(base)
    with pytest.raises(ExportFolderError, match=r"export folder .*base already holds files \(config\.json, "
                                                r"model-00001-of-0000\d\.safetensors, .*choose a new or empty folder"):
        save_pretrained(model(1), base)
    assert snapshot(base) == before
    assert same_weights(load_pretrained(base), model(0))
    assert not [p for p in os.listdir(base.parent) if ".writing-" in p]


def test_a_previous_export_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    save_pretrained(model(0), out, max_shard_bytes=20_000)  # sharded
    save_pretrained(model(1), out)  # one file: no shard or index of the first may remain
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", EXPORT_MARKER])
    assert same_weights(load_pretrained(out), model(1))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging or replaced folder left behind


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_pretrained(model(0), out)
    before = snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_io, "save_file", disk_full)
    with pytest.raises(OSError, match=f"export folder {out} could not be written: the disk is full"):
        save_pretrained(model(1), out)  # one line (ExportDiskFullError, an OSError too), issue 31
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_export_folder_rules(tmp_path):
    check_export_folder(tmp_path / "fresh" / "deeper")  # new (in a writable place): fine
    with pytest.raises(ExportFolderError, match="is a file"):
        check_export_folder(__file__)


def test_export_destination_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    check_export_destination(str(run / "export"), str(run))  # a folder of its own inside the run: fine
    check_export_destination(str(tmp_path / "elsewhere"), str(run))
    for bad, what in ((run, "is the run directory"), (tmp_path, "holds the run directory"),
                      (run / "checkpoints" / "x", "inside the run's 'checkpoints'"),
                      (run / "plots", "inside the run's 'plots'"), (run / "previous-20260101" / "e", "previous-")):
        with pytest.raises(ExportDestinationError, match=what):
            check_export_destination(str(bad), str(run))


def _train(tmp_path, capsys, *args):
    code = train_cli.main(["--no-progress", "--run-dir", str(tmp_path / "run"), *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_train_refuses_an_export_with_the_scratch_model_before_building(tmp_path, capsys):
    code, lines = _train(tmp_path, capsys, "--export", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: --export needs a pretrained model")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["base", "run"])
def test_train_refuses_a_doomed_export_folder_before_building(tmp_path, capsys, base, where):
    export = base if where == "base" else tmp_path / "run"
    (tmp_path / "run").mkdir()
    before = snapshot(base)
    code, lines = _train(tmp_path, capsys, "--set", "model.source=hf", "--set", f"model.path={base}",
                         "--export", str(export))
    assert code == 2 and len(lines) == 1, lines
    expected = "already holds files" if where == "base" else "is the run directory"
    assert lines[0].startswith("config error: export folder") and expected in lines[0], lines
    assert snapshot(base) == before and os.listdir(tmp_path / "run") == []
