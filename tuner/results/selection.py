"""Choosing the winner per table key from a run's measurements.

Only configs timed in a problem's last round take part (with successive halving, the
survivors, all timed with the same repeats). A candidate must be ``ok`` on every problem of
the key (several problems can fall into one bucket); its score is the sum of its medians.
The fastest wins, except where a default is within noise of it: first the untuned choice
(the platform's default variant with its heuristic config), then the winning variant's own
default config. "Within noise": its median is at most (1 + noise) times the winner's
(`select.noise` in the sweep file, 3% by default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attnbench.kernels import registry
from attnbench.kernels.table import Entry

from .records import baseline, baseline_times
from ..canonical_json import canonical


@dataclasses.dataclass
class _Score:
    variant: str
    config: dict[str, Any]
    is_default: bool
    median_us: float = 0.0
    p20_us: float = 0.0
    p80_us: float = 0.0
    problems: int = 0
    reference_us: float = 0.0
    default_us: float = 0.0
    fingerprints: set = dataclasses.field(default_factory=set)  # of the code measured

    def fingerprint(self) -> str | None:
        """The measured code's fingerprint; records of other code (a resumed run whose
        variant changed) give one that matches no code, so lookup treats the entry as stale."""
        known = sorted(f for f in self.fingerprints if f is not None)
        if len(self.fingerprints) == 1:
            return known[0] if known else None
        return "mixed:" + "+".join(known or ["unknown"])


def _last_round_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last: dict[str, int] = {}
    for record in records:
        if record.get("status") not in ("skipped", "skipped_static"):
            last[record["problem_id"]] = max(last.get(record["problem_id"], 0),
                                             record.get("round", 0))
    return [r for r in records if r.get("status") not in ("skipped", "skipped_static")
            and r.get("round", 0) == last.get(r["problem_id"])]


def _within_noise(candidate: _Score, winner: _Score, noise: float) -> bool:
    # Medians only: with few samples on a busy host the 20th-80th percentile ranges are wide
    # enough to overlap for configs several times apart.
    return candidate.median_us <= winner.median_us * (1 + noise)


def _peer_of(op: str, name: str):
    """The PeerOrigin of a registered peer variant, else None (ours, or one only a test
    registers)."""
    try:
        return registry.get_variant(op, name).peer
    except ValueError:
        return None


def select_winners(records: list[dict[str, Any]], *, noise: float, platform: str,
                   provenance: dict[str, Any]) -> list[Entry]:
    """One tuned-table entry per key measured in `records` (keys with no `ok` config: none),
    chosen among our variants; and per key, each peer's fastest config as its own entry
    (lookup passes peers' entries over unless a call names the peer with `variant=`)."""
    final = _last_round_records(records)
    problems_of_key: dict[str, set[str]] = {}
    scores: dict[str, dict[str, _Score]] = {}
    keys: dict[str, dict[str, Any]] = {}
    labels: dict[str, set[str]] = {}
    for record in final:
        key_text = canonical(record["key"])
        keys[key_text] = record["key"]
        problems_of_key.setdefault(key_text, set()).add(record["problem_id"])
        labels.setdefault(key_text, set()).add(record.get("problem", record["problem_id"]))
    baselines = baseline_times(records)
    for record in final:
        if record["status"] != "ok":
            continue
        key_text = canonical(record["key"])
        name = canonical([record["variant"], record["config"]])
        score = scores.setdefault(key_text, {}).setdefault(
            name, _Score(record["variant"], record["config"], bool(record.get("is_default"))))
        score.fingerprints.add(record.get("fingerprint"))
        score.median_us += record["median_us"]
        score.p20_us += record["p20_us"]
        score.p80_us += record["p80_us"]
        score.problems += 1
        for name, field in (("reference", "reference_us"), (record["variant"], "default_us")):
            value = baseline(baselines, record, name)
            setattr(score, field, getattr(score, field) + (float("nan") if value is None else value))

    entries = []
    for key_text, by_config in scores.items():
        needed = len(problems_of_key[key_text])
        complete = [s for s in by_config.values() if s.problems == needed]
        op = keys[key_text]["op"]
        ours = [s for s in complete if _peer_of(op, s.variant) is None]
        if ours:
            entries.append(_winner(ours, keys[key_text], needed, noise, platform, provenance,
                                   sorted(labels[key_text])))
        for name in sorted({s.variant for s in complete} - {s.variant for s in ours}):
            fastest = min((s for s in complete if s.variant == name), key=lambda s: s.median_us)
            origin = _peer_of(op, name)
            entries.append(_entry(fastest, keys[key_text], needed, provenance,
                                  sorted(labels[key_text]), f"fastest ok config of peer {name}",
                                  peer=f"{origin.project} {origin.version()}"))
    entries.sort(key=lambda e: canonical(e.key))
    return entries


def _winner(complete: list[_Score], key: dict[str, Any], needed: int, noise: float,
            platform: str, provenance: dict[str, Any], problems: list[str]) -> Entry:
    fastest = min(complete, key=lambda s: s.median_us)
    chosen, why = fastest, "fastest ok config"
    untuned = registry.default_variant_name(key["op"], platform)
    preferred = [s for s in complete if s.is_default and s.variant == untuned]
    preferred += [s for s in complete if s.is_default and s.variant == fastest.variant]
    for default in preferred:
        if default is fastest:
            break
        if _within_noise(default, fastest, noise):
            chosen = default
            why = (f"default of {default.variant} is within noise of the fastest "
                   f"({fastest.variant} {canonical(fastest.config)}: "
                   f"{fastest.median_us / needed:.1f} us)")
            break
    return _entry(chosen, key, needed, provenance, problems, why)


def _entry(chosen: _Score, key: dict[str, Any], needed: int, provenance: dict[str, Any],
           problems: list[str], why: str, peer: str | None = None) -> Entry:
    source = {
        **provenance,
        "fingerprint": chosen.fingerprint(),
        "problems": problems,
        "chosen": why,
        "p20_us": chosen.p20_us / needed,
        "p80_us": chosen.p80_us / needed,
        "speedup_vs_default": chosen.default_us / chosen.median_us,
        "speedup_vs_reference": chosen.reference_us / chosen.median_us,
    }
    if peer is not None:
        source["peer"] = peer
    source = {k: (None if isinstance(v, float) and v != v else v) for k, v in source.items()}
    return Entry(op=key["op"], variant=chosen.variant, key=key, config=dict(chosen.config),
                 time_us=chosen.median_us / needed, source=source)
