"""train/provenance.py: what the files say the model trained on, across resumes; train/ack_relay.py: which ranks share
one acknowledgement call."""
import json

from train.provenance import ProvenanceLog


def write(path, steps):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "tags": [], "dropped": []}) + "\n" for s in steps))


def steps_in(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resume_on_fewer_ranks_drops_the_missing_ranks_records_past_the_checkpoint(tmp_path):
    """2 ranks trained to step 55, a kill, a resume from step 50 on 1 rank: rank 1's steps 51-55 were lost with the
    killed run, so rank 0 drops them; nothing at or before the checkpoint goes (found by benchmarks/epoch_balance.py:
    the kept records made samples look trained twice)."""
    folder = tmp_path / "provenance"
    write(folder / "rank_0.jsonl", range(1, 56))
    write(folder / "rank_1.jsonl", range(1, 56))
    ProvenanceLog(tmp_path, 0, True, world_size=1).resume(50)
    assert steps_in(folder / "rank_0.jsonl") == list(range(1, 51))
    assert steps_in(folder / "rank_1.jsonl") == list(range(1, 51))


def test_a_rank_leaves_the_other_present_ranks_files_to_them(tmp_path):
    folder = tmp_path / "provenance"
    write(folder / "rank_0.jsonl", range(1, 10))
    write(folder / "rank_1.jsonl", range(1, 10))
    ProvenanceLog(tmp_path, 0, True, world_size=2).resume(5)
    assert steps_in(folder / "rank_1.jsonl") == list(range(1, 10))  # rank 1 is in this world: it truncates its own
    ProvenanceLog(tmp_path, 1, True, world_size=2).resume(5)
    assert steps_in(folder / "rank_1.jsonl") == list(range(1, 6))


def test_each_nodes_data_parallel_leaders_share_one_acknowledgement_call():
    from train.ack_relay import node_leaders

    two_nodes = ["a"] * 8 + ["b"] * 8
    assert node_leaders(two_nodes, 1) == [list(range(8)), list(range(8, 16))]
    assert node_leaders(two_nodes, 2) == [[0, 2, 4, 6], [8, 10, 12, 14]]  # sequence parallel: only leaders acknowledge
    assert node_leaders(two_nodes, 8) == [[0], [8]]  # a group per node: nothing to relay
    assert node_leaders(["a", "b", "a", "b"], 1) == [[0, 2], [1, 3]]  # a launcher that deals ranks round-robin
    assert node_leaders(["x", "x"], 1) == [[0, 1]]
