from data.licenses import LICENSE_MISSING, LICENSE_NOT_ALLOWED, Audit, LicensePolicy
from data.schema import metadata_problems


def test_policy_gives_a_reason_for_every_sample_it_refuses():
    policy = LicensePolicy.from_ids(["CC0-1.0", "CC-BY-4.0"])
    assert policy.rejection({"license": "CC0-1.0"}) is None
    assert policy.rejection({}) == LICENSE_MISSING
    assert policy.rejection({"license": ""}) == LICENSE_MISSING
    assert policy.rejection({"license": "   "}) == LICENSE_MISSING
    assert policy.rejection({"license": None}) == LICENSE_MISSING
    assert policy.rejection({"license": 3}) == LICENSE_MISSING
    assert policy.rejection({"license": "CC-BY-NC-4.0"}) == LICENSE_NOT_ALLOWED
    assert policy.rejection({"license": "cc0-1.0"}) == LICENSE_NOT_ALLOWED  # ids are exact


def test_metadata_contract_lists_missing_and_bad_fields():
    good = {"license": "CC0-1.0", "source_url": "u", "attribution": "a", "rights_holder": "r",
            "width": 96, "height": 64, "fps": 12, "num_frames": 24}
    assert metadata_problems(good) == []
    bad = dict(good, width=-1)
    del bad["rights_holder"]
    assert metadata_problems(bad) == ["missing rights_holder", "width is not a positive number"]


def test_audit_merges_ranks_and_survives_a_state_round_trip():
    a, b = Audit(policy=["CC0-1.0"]), Audit(policy=["CC0-1.0"])
    a.record_trained("s0.tar", "CC0-1.0", "Kino", "kino:1")
    a.record_trained("s0.tar", "CC0-1.0", "Kino", "kino:2")
    b.record_trained("s1.tar", "CC-BY-3.0", "Blender Foundation", "https://peach.blender.org/")
    a.record_dropped(LICENSE_MISSING, "k1")
    b.record_dropped(LICENSE_MISSING, "k1")
    b.record_dropped(LICENSE_NOT_ALLOWED, "k2")
    merged = Audit.from_state(a.merge(b).state_dict())
    assert merged.license_totals() == {"CC0-1.0": 2, "CC-BY-3.0": 1}
    assert merged.consumed == {"s0.tar": {"CC0-1.0": 2}, "s1.tar": {"CC-BY-3.0": 1}}
    assert merged.rights_holders["s1.tar"] == {"Blender Foundation": 1}
    assert merged.dropped == {LICENSE_MISSING: 2, LICENSE_NOT_ALLOWED: 1}
    assert merged.dropped_examples[LICENSE_MISSING] == ["k1"]
