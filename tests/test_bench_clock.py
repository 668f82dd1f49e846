"""bench.common.clock_summary: the GPU clock log the training benchmark reports with its step times."""

import datetime

from bench.common import clock_summary

LINES = [
    "2026/12/03 13:37:53.550, 1980, 173.10, 0x0000000000000000",
    "2026/12/03 13:37:54.051, 1665, 420.36, 0x0000000000000004",
    "2026/12/03 13:37:54.151, 1770, 484.42, 0x0000000000000004",
    "2026/12/03 13:37:54.251, 1725, 534.78, 0x0000000000000000",
    "2026/12/03 13:37:54.351, [N/A], 582.44, 0x0000000000000004",
    "2026/12/03 13:37:54.4",
]


def stamp(seconds: float) -> float:
    return datetime.datetime(2026, 12, 3, 13, 37, 54).timestamp() + seconds


def test_the_summary_covers_only_the_samples_inside_the_window():
    summary = clock_summary(LINES, stamp(0.0), stamp(0.3))
    assert summary == {"samples": 3, "sm_clock_mhz": 1725.0, "power_w": 484.42, "power_capped_share": 2 / 3}


def test_no_sample_in_the_window_gives_none():
    assert clock_summary(LINES, stamp(5.0), stamp(6.0)) is None
