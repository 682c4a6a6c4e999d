"""Per-stage sample accounting: in == out + sum(dropped), by reason, written to `stats.json`.

Every task of a stage returns its counts; the runner stores them in the task's done-marker and sums
the markers, so a resumed run reports exactly what an uninterrupted one does.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass
class StageCounts:
  """Samples that entered a stage, left it, and were dropped (by reason)."""
  in_: int = 0
  out: int = 0
  dropped: collections.Counter = field(default_factory=collections.Counter)

  def drop(self, reason: str, n: int = 1) -> None:
    self.dropped[reason] += n

  def add(self, other: "StageCounts") -> None:
    self.in_ += other.in_
    self.out += other.out
    self.dropped.update(other.dropped)

  def to_dict(self) -> dict:
    return {"in": self.in_, "out": self.out, "dropped": dict(sorted(self.dropped.items()))}

  @classmethod
  def from_dict(cls, d: Mapping) -> "StageCounts":
    return cls(int(d["in"]), int(d["out"]), collections.Counter({k: int(v) for k, v in d["dropped"].items()}))


@dataclass
class TaskResult:
  """What one task reports: counts per stats stage (a task may feed several) and free counters."""
  counts: dict[str, StageCounts] = field(default_factory=dict)
  counters: collections.Counter = field(default_factory=collections.Counter)

  def stage(self, name: str) -> StageCounts:
    return self.counts.setdefault(name, StageCounts())

  def to_dict(self) -> dict:
    return {"counts": {k: v.to_dict() for k, v in self.counts.items()}, "counters": dict(self.counters)}

  @classmethod
  def from_dict(cls, d: Mapping) -> "TaskResult":
    return cls({k: StageCounts.from_dict(v) for k, v in d["counts"].items()},
               collections.Counter(d.get("counters", {})))


def merge_results(results: Iterable[TaskResult], stage_order: Iterable[str]) -> dict:
  """Sums task results into the `stats.json` object; stages appear in pipeline order."""
  totals: dict[str, StageCounts] = {}
  counters: collections.Counter = collections.Counter()
  for result in results:
    for name, counts in result.counts.items():
      totals.setdefault(name, StageCounts()).add(counts)
    counters.update(result.counters)
  order = [name for name in stage_order if name in totals] + sorted(set(totals) - set(stage_order))
  return {"stages": {name: totals[name].to_dict() for name in order},
          "counters": dict(sorted(counters.items()))}


def check_balanced(stats: Mapping) -> None:
  """Raises ValueError naming the first stage where in != out + sum(dropped)."""
  for name, s in stats["stages"].items():
    if s["in"] != s["out"] + sum(s["dropped"].values()):
      raise ValueError(f"stage {name}: in={s['in']} != out={s['out']} + dropped={sum(s['dropped'].values())}")


def format_summary(stats: Mapping) -> str:
  """One line per stage: `stage: in -> out (dropped: reason n, ...)`, then one per stage with failed tasks."""
  lines = []
  for name, s in stats["stages"].items():
    drops = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "none"
    lines.append(f"  {name:<15} {s['in']:>8} -> {s['out']:>8}  (dropped: {drops})")
  for name, f in stats.get("failed", {}).items():
    lines.append(f"  {name:<15} {f['tasks']} failed tasks (retried on the next run); first error: {f['first_error']}")
  return "\n".join(lines)


def dumps(stats: Mapping) -> str:
  return json.dumps(stats, indent=2, sort_keys=False) + "\n"


def filter_counts(kept: int, dropped: Mapping[str, int]) -> StageCounts:
  """A filter's decisions as a stage's counts: in == out + sum(dropped) by construction."""
  return StageCounts(in_=kept + sum(dropped.values()), out=kept, dropped=collections.Counter(dropped))
