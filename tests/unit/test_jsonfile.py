"""Damaged JSON files that users hand us (configs, adapter configs, safetensors indexes) are named, not tracebacks."""

from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.jsonfile import read_json, read_json_in
from trainer.weights import INDEX_NAME, indexed_weight_files


def test_a_cut_off_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  "num_hidden_layers": ')
    with pytest.raises(UserError, match=rf"{path}:3: not valid JSON \(Expecting value, column 24\)"):
        read_json(str(path))


def test_an_object_is_required_where_one_is_expected(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object, found list"):
        read_json_in(str(tmp_path), "adapter_config.json", "unused")
    with pytest.raises(UserError, match="^no adapter here$"):
        read_json_in(str(tmp_path / "elsewhere"), "adapter_config.json", "no adapter here")


def test_sharded_weights_are_listed_from_the_index_and_a_damaged_index_is_refused(tmp_path):
    assert indexed_weight_files(str(tmp_path)) is None  # not sharded
    (tmp_path / INDEX_NAME).write_text('{"weight_map": {"a": "model-00002.safetensors", "b": "model-00001.safetensors",'
                                       ' "c": "model-00001.safetensors"}}')
    assert indexed_weight_files(str(tmp_path)) == ["model-00001.safetensors", "model-00002.safetensors"]
    (tmp_path / INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(UserError, match="has no weight_map"):
        indexed_weight_files(str(tmp_path))
