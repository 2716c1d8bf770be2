"""Garrison's own aggregation of its counters and histograms, read when metrics are
collected.

Counting a run or timing a step is a dict update here (about 0.1-0.2 µs); the same
through prometheus-client is 1.5-3 µs and through the OpenTelemetry SDK 6-10 µs, most of
it spent cleaning and hashing the attributes of each measurement (benchmarks/
observability_overhead.py, docs/observability.md "Cost"). The values are kept on the
event loop's thread and read by the collecting thread (a scrape, a periodic exporter)
through a copy made in one step under the GIL, so a reader never sees a dict change
size under it; a histogram's count is the sum of its buckets, so the two always agree.

- `Tally`: a monotonic sum per label values (a counter).
- `Buckets`: a histogram per label values, upper bounds inclusive (Prometheus's `le`),
  with, per bucket, the latest exemplar given (a trace and span id: OpenMetrics
  exposition shows it, so a slow bucket leads to a trace).
- `PrometheusView`: a prometheus-client collector exposing tallies and buckets as
  counter and histogram families.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

__all__ = ["Buckets", "PrometheusView", "Tally"]

# How prometheus-client writes a bucket bound (`le`); the library leaves it untyped.
_le = cast(Callable[[float], str], floatToGoString)

Key = tuple[str, ...]  # label values, in the order of the metric's label names


class Tally:
    """A counter per label values. A counter without labels exists from the start, at
    0, as prometheus-client's does."""

    __slots__ = ("created", "doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.values: dict[Key, float] = {}
        self.created: dict[Key, float] = {}
        if not self.labels:
            self.values[()] = 0
            self.created[()] = time.time()

    def add(self, key: Key, amount: float = 1) -> None:
        values = self.values
        value = values.get(key)
        if value is None:
            self.created[key] = time.time()
            values[key] = amount
        else:
            values[key] = value + amount

    def snapshot(self) -> list[tuple[Key, float]]:
        return list(self.values.items())  # one C-level copy: safe from another thread

    def merged(self, parts: Iterable[Tally]) -> Tally:
        """A tally like this one holding the sum of `parts` (the apps sharing one
        Prometheus registry), each series created when its first part's was."""
        total = Tally(self.name, self.doc, self.labels)
        for part in parts:
            values, created = part.snapshot(), part.created.copy()  # as collect() reads
            for key, value in values:
                total.values[key] = total.values.get(key, 0) + value
                when = created.get(key, total.created.get(key, time.time()))
                total.created[key] = min(when, total.created.get(key, when))
        return total


def _when(exemplar: Exemplar) -> float:
    return float(exemplar.timestamp or 0.0)  # always set by `Buckets.observe`


def _created_series() -> bool:
    """Whether `_created` samples are exposed: prometheus-client's
    `disable_created_metrics()` (or PROMETHEUS_DISABLE_CREATED_SERIES) turns them off."""
    return bool(getattr(prometheus_metrics, "_use_created", True))


class Buckets:
    """A histogram per label values: a count per bucket (a value lands in the first
    bucket whose upper bound is >= it; the last bucket is +Inf) and the sum. The sum is
    updated right after the bucket, with no call in between: under the GIL a reader
    sees count and sum agree."""

    __slots__ = ("_width", "bounds", "created", "doc", "exemplars", "labels", "name",
                 "series")

    def __init__(self, name: str, doc: str, labels: Sequence[str],
                 bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram {name}: bucket bounds must increase, got {bounds}")
        self.name = name
        self.doc = doc
        self.labels = tuple(labels)
        self.bounds = tuple(float(b) for b in bounds)
        self._width = len(self.bounds) + 1  # the buckets, +Inf included; then the sum
        self.series: dict[Key, list[float]] = {}
        self.created: dict[Key, float] = {}
        # per series, per bucket index: the latest exemplar observed in it
        self.exemplars: dict[Key, dict[int, Exemplar]] = {}

    def observe(self, key: Key, value: float,
                exemplar: dict[str, str] | None = None) -> None:
        """Count `value` under `key`; `exemplar` (labels such as a trace id and span
        id) becomes its bucket's exemplar, replacing the one before."""
        row = self.series.get(key)
        if row is None:
            self.created[key] = time.time()  # before the series: a reader sees both
            row = self.series[key] = [0] * (self._width + 1)
        index = bisect_left(self.bounds, value)
        row[index] += 1
        row[-1] += value
        if exemplar is not None:
            self.exemplars.setdefault(key, {})[index] = Exemplar(exemplar, value,
                                                                 time.time())

    def merged(self, parts: Iterable[Buckets]) -> Buckets:
        """A histogram like this one holding the sum of `parts`, as `Tally.merged`."""
        total = Buckets(self.name, self.doc, self.labels, self.bounds)
        for part in parts:
            # exemplars first (as `PrometheusView.collect`): the latest of all parts'
            for key, marks in list(part.exemplars.items()):
                newest = total.exemplars.setdefault(key, {})
                for index, mark in marks.copy().items():
                    other = newest.get(index)
                    if other is None or _when(mark) > _when(other):
                        newest[index] = mark
            rows, created = list(part.series.items()), part.created.copy()
            for key, row in rows:
                row = row.copy()
                kept = total.series.get(key)
                total.series[key] = row if kept is None else [a + b for a, b in
                                                              zip(kept, row, strict=True)]
                when = created.get(key, total.created.get(key, time.time()))
                total.created[key] = min(when, total.created.get(key, when))
        return total

    def snapshot(self) -> list[tuple[Key, list[float]]]:
        """Per series, the cumulative counts (one per bound, then +Inf) and the sum."""
        taken = [(key, row.copy()) for key, row in list(self.series.items())]
        result = []
        for key, row in taken:
            total, cumulative = 0.0, []
            for count in row[:-1]:
                total += count
                cumulative.append(total)
            result.append((key, [*cumulative, row[-1]]))
        return result


class PrometheusView(Collector):
    """Exposes tallies as counter families and buckets as histogram families."""

    def __init__(self, tallies: Iterable[Tally], buckets: Iterable[Buckets]) -> None:
        self.tallies = tuple(tallies)
        self.buckets = tuple(buckets)

    def describe(self) -> Iterable[Metric]:
        for tally in self.tallies:
            yield CounterMetricFamily(tally.name, tally.doc, labels=tally.labels)
        for histogram in self.buckets:
            yield HistogramMetricFamily(histogram.name, histogram.doc,
                                        labels=histogram.labels)

    def collect(self) -> Iterable[Metric]:
        with_created = _created_series()
        for tally in self.tallies:
            counter = CounterMetricFamily(tally.name, tally.doc, labels=tally.labels)
            values = tally.snapshot()  # then the creation times: `add` writes them first
            created = tally.created.copy()
            for key, value in sorted(values):
                counter.add_metric(list(key), value,
                                   created=created.get(key) if with_created else None)
            yield counter
        for histogram in self.buckets:
            family = HistogramMetricFamily(histogram.name, histogram.doc,
                                           labels=histogram.labels)
            edges = [_le(b) for b in histogram.bounds] + ["+Inf"]
            # exemplars first: each is then of a value the counts read next include
            exemplars = {key: marks.copy() for key, marks in
                         list(histogram.exemplars.items())}
            rows = histogram.snapshot()
            created = histogram.created.copy()
            for key, row in sorted(rows):
                marks = exemplars.get(key, {})
                family.add_metric(
                    list(key),
                    [(edge, count) if (mark := marks.get(i)) is None else (edge, count, mark)
                     for i, (edge, count) in enumerate(zip(edges, row[:-1], strict=True))],
                    sum_value=row[-1])
                if with_created and key in created:  # as prometheus-client's Histogram
                    family.add_sample(f"{histogram.name}_created",
                                      dict(zip(histogram.labels, key, strict=True)),
                                      created[key])
            yield family
