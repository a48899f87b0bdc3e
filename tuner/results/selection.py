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


def select_winners(records: list[dict[str, Any]], *, noise: float, platform: str,
                   provenance: dict[str, Any]) -> list[Entry]:
    """One tuned-table entry per key measured in `records` (keys with no `ok` config: none)."""
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
        if not complete:
            continue
        fastest = min(complete, key=lambda s: s.median_us)
        chosen, why = fastest, "fastest ok config"
        op = keys[key_text]["op"]
        untuned = registry.DEFAULT_VARIANT.get((op, platform))
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
        per_problem = chosen.median_us / needed
        source = {
            **provenance,
            "fingerprint": chosen.fingerprint(),
            "problems": sorted(labels[key_text]),
            "chosen": why,
            "p20_us": chosen.p20_us / needed,
            "p80_us": chosen.p80_us / needed,
            "speedup_vs_default": chosen.default_us / chosen.median_us,
            "speedup_vs_reference": chosen.reference_us / chosen.median_us,
        }
        source = {k: (None if isinstance(v, float) and v != v else v) for k, v in source.items()}
        entries.append(Entry(op=op, variant=chosen.variant, key=keys[key_text],
                             config=dict(chosen.config), time_us=per_problem, source=source))
    entries.sort(key=lambda e: canonical(e.key))
    return entries
