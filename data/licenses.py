"""License policy and the audit of what was trained on.

The gate runs on metadata before any decoding: a sample whose license is missing
or not allowed is dropped, counted per reason, and never decoded or trained on.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

LICENSE_MISSING = "license_missing"
LICENSE_NOT_ALLOWED = "license_not_allowed"


@dataclass(frozen=True)
class LicensePolicy:
    allow: frozenset

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> "LicensePolicy":
        return cls(frozenset(ids))

    def rejection(self, meta: Dict[str, Any]) -> Optional[str]:
        """The reason a sample may not be trained on, or None if its license is allowed."""
        license_id = meta.get("license")
        if not isinstance(license_id, str) or not license_id.strip():
            return LICENSE_MISSING
        if license_id not in self.allow:
            return LICENSE_NOT_ALLOWED
        return None


@dataclass
class Audit:
    """What a run trained on, per shard and license, and what it dropped and why."""

    policy: List[str] = field(default_factory=list)
    consumed: Dict[str, Counter] = field(default_factory=dict)  # shard -> license -> samples
    rights_holders: Dict[str, Counter] = field(default_factory=dict)  # shard -> rights holder -> samples
    sources: Dict[str, Counter] = field(default_factory=dict)  # shard -> source url -> samples
    dropped: Counter = field(default_factory=Counter)  # reason -> samples
    dropped_examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> first keys

    MAX_EXAMPLES = 20

    def record_trained(self, shard: str, license_id: str, rights_holder: str, source_url: str) -> None:
        self.consumed.setdefault(shard, Counter())[license_id] += 1
        self.rights_holders.setdefault(shard, Counter())[rights_holder] += 1
        self.sources.setdefault(shard, Counter())[source_url] += 1

    def record_dropped(self, reason: str, key: str) -> None:
        self.dropped[reason] += 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < self.MAX_EXAMPLES and key not in examples:
            examples.append(key)

    def merge(self, other: "Audit") -> "Audit":
        merged = Audit.from_state(self.state_dict())
        for target, source in ((merged.consumed, other.consumed), (merged.rights_holders, other.rights_holders),
                               (merged.sources, other.sources)):
            for shard, counts in source.items():
                target.setdefault(shard, Counter()).update(counts)
        merged.dropped.update(other.dropped)
        for reason, keys in other.dropped_examples.items():
            for key in keys:
                merged_keys = merged.dropped_examples.setdefault(reason, [])
                if len(merged_keys) < self.MAX_EXAMPLES and key not in merged_keys:
                    merged_keys.append(key)
        merged.policy = sorted(set(self.policy) | set(other.policy))
        return merged

    def license_totals(self) -> Counter:
        total = Counter()
        for counts in self.consumed.values():
            total.update(counts)
        return total

    def state_dict(self) -> Dict[str, Any]:
        return {
            "policy": sorted(self.policy),
            "consumed": {s: dict(c) for s, c in sorted(self.consumed.items())},
            "rights_holders": {s: dict(c) for s, c in sorted(self.rights_holders.items())},
            "sources": {s: dict(c) for s, c in sorted(self.sources.items())},
            "license_totals": dict(self.license_totals()),
            "dropped": dict(self.dropped),
            "dropped_examples": {r: list(k) for r, k in self.dropped_examples.items()},
        }

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "Audit":
        return cls(
            policy=list(state.get("policy", [])),
            consumed={s: Counter(c) for s, c in state.get("consumed", {}).items()},
            rights_holders={s: Counter(c) for s, c in state.get("rights_holders", {}).items()},
            sources={s: Counter(c) for s, c in state.get("sources", {}).items()},
            dropped=Counter(state.get("dropped", {})),
            dropped_examples={r: list(k) for r, k in state.get("dropped_examples", {}).items()},
        )
