"""pidec.serving.prometheus: the text format the service writes, and reading it back."""

import math
import threading

import pytest

from pidec.serving.prometheus import Registry, parse, total


def registry():
    r = Registry()
    r.counter("reqs_total", "answers by code", ("path", "code"))
    r.histogram("lat_seconds", "latency", (0.1, 1.0), ("path",))
    depth = {"v": 3}
    r.gauge("depth", 'queue "depth"\nnow', lambda: depth["v"])
    return r, depth


def test_render_and_parse_round_trip():
    r, depth = registry()
    r.inc("reqs_total", path="/v1/generate", code="200")
    r.inc("reqs_total", 2, path="/v1/generate", code="422")
    r.inc("reqs_total", path='we"ird\\path\n', code="404")
    for x in (0.05, 0.5, 5.0):
        r.observe("lat_seconds", x, path="/v1/generate")
    depth["v"] = 7  # gauges are read when the page is rendered
    text = r.render()
    assert "# TYPE reqs_total counter" in text and "# TYPE lat_seconds histogram" in text
    assert '# HELP depth queue \\"depth\\"\\nnow' in text
    s = parse(text)
    assert s[("reqs_total", (("code", "422"), ("path", "/v1/generate")))] == 2
    assert s[("reqs_total", (("code", "404"), ("path", 'we"ird\\path\n')))] == 1  # escaped and back
    assert s[("depth", ())] == 7
    # buckets are cumulative, +Inf equals the count
    buckets = [s[("lat_seconds_bucket", (("le", le), ("path", "/v1/generate")))] for le in ("0.1", "1", "+Inf")]
    assert buckets == [1, 2, 3]
    assert s[("lat_seconds_count", (("path", "/v1/generate"),))] == 3
    assert math.isclose(s[("lat_seconds_sum", (("path", "/v1/generate"),))], 5.55)
    assert total(s, "reqs_total") == 4 and total(s, "reqs_total", path="/v1/generate") == 3
    assert total(s, "reqs_total", code="500") == 0


def test_declaration_and_label_mistakes_are_errors():
    r, _ = registry()
    with pytest.raises(ValueError, match="declared twice"):
        r.counter("reqs_total", "again")
    with pytest.raises(ValueError, match="takes labels"):
        r.inc("reqs_total", path="/x")
    with pytest.raises(ValueError, match="line 2 is not a Prometheus sample"):
        parse("# HELP x y\nnot a sample line\n")


def test_concurrent_increments_are_all_counted():
    r, _ = registry()

    def work():
        for _ in range(2000):
            r.inc("reqs_total", path="/v1/generate", code="200")
            r.observe("lat_seconds", 0.2, path="/v1/generate")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = parse(r.render())
    assert total(s, "reqs_total") == 8000 and total(s, "lat_seconds_count") == 8000
