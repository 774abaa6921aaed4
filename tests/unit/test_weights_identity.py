"""models/weights.py: the identity of a weights directory is the sha256 of the files a loader reads: an index's
shards, else the first format present; extra copies in another format leave it unchanged, other weights change
it."""
import json

from models.weights import weight_paths, weights_sha256


def test_the_identity_covers_the_loaded_files_only(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    first = weights_sha256(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"a copy in another format")
    assert weights_sha256(tmp_path) == first and weight_paths(tmp_path) == [tmp_path / "model.safetensors"]
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert weights_sha256(tmp_path) != first


def test_a_sharded_checkpoint_is_its_index_shards(tmp_path):
    for name in ("a-00001.safetensors", "a-00002.safetensors", "unrelated.safetensors"):
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "a-00001.safetensors", "y": "a-00002.safetensors", "z": "a-00001.safetensors"}}))
    assert weight_paths(tmp_path) == [tmp_path / "a-00001.safetensors", tmp_path / "a-00002.safetensors"]
    assert weights_sha256(tmp_path / "a-00001.safetensors") != weights_sha256(tmp_path)
