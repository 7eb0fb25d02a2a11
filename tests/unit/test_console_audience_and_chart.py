"""The console's pure parts: the audience picker's form parsing and the throughput chart's
bucketing and markup."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from services.console.audience import AudienceChoice, split_ids
from services.console.throughput_chart import MAX_BARS, buckets, throughput_svg

T0 = datetime(2026, 12, 7, 11, 0, tzinfo=UTC)


def test_a_choice_takes_repeated_and_comma_separated_ids_once_each_in_order():
    values = {"list_ids": ["news", "vip, news"], "contact_ids": ["c1 c2,c1"], "segment_ids": []}
    choice = AudienceChoice.from_values(lambda name: values.get(name, []))
    assert choice.list_ids == ("news", "vip") and choice.contact_ids == ("c1", "c2")
    assert not choice.faults and not choice.empty
    assert choice.send_payload() == {"contact_ids": ["c1", "c2"], "list_ids": ["news", "vip"],
                                     "segment_ids": [], "exclude_list_ids": [], "exclude_segment_ids": []}
    assert choice.query() == "contact_ids=c1&contact_ids=c2&list_ids=news&list_ids=vip"
    assert split_ids([" a, ,b ", ""]) == ["a", "b"]


def test_bad_ids_are_named_in_the_faults_and_left_out():
    values = {"list_ids": ["ok", "x" * 300], "exclude_segment_ids": ["bad/id"]}
    choice = AudienceChoice.from_values(lambda name: values.get(name, []))
    assert choice.list_ids == ("ok",) and choice.exclude_segment_ids == ()
    assert len(choice.faults) == 2 and all("is not a valid id" in f for f in choice.faults)


def test_exclusions_alone_reach_nobody():
    assert AudienceChoice(exclude_list_ids=("news",)).empty


def test_buckets_keep_every_settled_recipient_once_and_stay_within_the_bar_limit():
    series = [(T0 + timedelta(seconds=s), s % 7 + 1) for s in range(0, 1000, 3)]
    bars = buckets(series)
    assert len(bars) <= MAX_BARS
    assert sum(b.settled for b in bars) == sum(n for _, n in series)
    assert bars[0].start == T0 and all(b.seconds == bars[0].seconds for b in bars)
    assert bars[-1].start <= series[-1][0] < bars[-1].start + timedelta(seconds=bars[-1].seconds)


def test_a_short_series_gets_one_bar_per_second():
    bars = buckets([(T0, 4), (T0 + timedelta(seconds=2), 6)])
    assert [(b.seconds, b.settled) for b in bars] == [(1, 4), (1, 0), (1, 6)]


def test_the_svg_is_titled_described_and_scaled_to_the_peak():
    svg = throughput_svg([(T0, 5), (T0 + timedelta(seconds=1), 10)])
    assert svg.startswith("<svg") and 'role="img"' in svg
    assert 'aria-labelledby="throughput-title throughput-desc"' in svg
    desc = re.search(r"<desc[^>]*>(.*?)</desc>", svg)
    assert desc and "15 recipients settled" in desc.group(1)
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert heights[1] == 2 * heights[0] and "10.0/s" in svg
    assert throughput_svg([]) == ""
