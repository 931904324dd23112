"""Request profiles: which per-request knobs (entropy threshold, latency budget) a request carries.

A production mix has clients with different needs on the same server (a strict threshold for one,
a tight budget for another); `--mix` reproduces that, and the report breaks results down by profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Mix keys -> the /classify body field they set.
FIELDS = {"threshold": "entropy_threshold", "budget": "latency_budget_ms"}


@dataclass(frozen=True)
class Profile:
    name: str  # as written in the report, e.g. "threshold=0.1"
    overrides: dict[str, float] = field(default_factory=dict)  # extra /classify body fields
    weight: float = 1.0


def profiles_from_args(threshold: float | None, budget_ms: float | None, mix: str | None) -> list[Profile]:
    """One profile from --threshold/--budget-ms (both may be set), or the weighted --mix."""
    if mix is not None:
        if threshold is not None or budget_ms is not None:
            raise ValueError("--mix replaces --threshold and --budget-ms; give one or the other")
        return parse_mix(mix)
    overrides: dict[str, float] = {}
    names = []
    for key, value in (("threshold", threshold), ("budget", budget_ms)):
        if value is not None:
            overrides[FIELDS[key]] = _checked(key, value)
            names.append(f"{key}={value:g}")
    return [Profile(",".join(names) or "default", overrides)]


def parse_mix(spec: str) -> list[Profile]:
    """Parse "threshold=0.1:0.5,budget=20:0.3,default:0.2" (KEY=VALUE:WEIGHT; weight defaults to 1).

    "default" sends neither field, so the server's own default threshold applies.
    """
    profiles = []
    for entry in (part.strip() for part in spec.split(",")):
        head, _, weight_text = entry.partition(":")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"--mix entry {entry!r}: weight {weight_text!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"--mix entry {entry!r}: weight must be positive")
        if head == "default":
            profiles.append(Profile("default", {}, weight))
            continue
        key, _, value_text = head.partition("=")
        if key not in FIELDS or not value_text:
            raise ValueError(f"--mix entry {entry!r}: expected threshold=T[:W], budget=MS[:W] or default[:W]")
        try:
            value = _checked(key, float(value_text))
        except ValueError as err:
            raise ValueError(f"--mix entry {entry!r}: {err}") from None
        profiles.append(Profile(f"{key}={value:g}", {FIELDS[key]: value}, weight))
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"--mix {spec!r}: a profile is listed twice")
    return profiles


def _checked(key: str, value: float) -> float:
    if key == "threshold" and not value >= 0:
        raise ValueError(f"threshold must be >= 0, got {value:g}")
    if key == "budget" and not value > 0:
        raise ValueError(f"budget must be > 0 ms, got {value:g}")
    return value
