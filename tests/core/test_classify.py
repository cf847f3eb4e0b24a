"""Classification: precedence, matchers, http_status, Retry-After, network errors, signals."""

from __future__ import annotations

import email.message
import logging
import pickle
import socket
import urllib.error
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from safetynet.core.classify import (
    ALWAYS_RETRY,
    Rules,
    Verdict,
    as_matchers,
    describe_matcher,
    http_date,
    http_status,
    is_network_error,
    parse_retry_after,
    retry_after_of,
    status_of,
)
from safetynet.exceptions import ConfigurationError, Permanent, SafetynetError, Snooze, TaskSignal, Transient

NOW = 1_700_000_000.0  # a fixed "now", seconds since the epoch


# --- real HTTP errors of the three libraries ------------------------------------------------


def requests_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    response.url = "http://example.test/"
    return requests.HTTPError(f"{status} error", response=response)


def httpx_error(status: int, headers: dict[str, str] | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://x")
    response = httpx.Response(status, headers=headers, request=request)
    return httpx.HTTPStatusError(f"{status} error", request=request, response=response)


def urllib_error(status: int, headers: dict[str, str] | None = None) -> urllib.error.HTTPError:
    hdrs = email.message.Message()
    for name, value in (headers or {}).items():
        hdrs[name] = value
    return urllib.error.HTTPError("http://x", status, "error", hdrs, None)


HTTP_ERRORS = pytest.mark.parametrize("make_error", [requests_error, httpx_error, urllib_error], ids=["requests", "httpx", "urllib"])


# --- precedence ---------------------------------------------------------------------------------
# Snooze > Permanent > Transient > fail_on > retry_on > DEFAULT_FAIL_ON > DEFAULT_RETRY_ON > UNCLASSIFIED


class SnoozeAndPermanent(Snooze, Permanent):
    pass


class PermanentAndTransient(Permanent, Transient):
    pass


def always(exception: BaseException) -> bool:
    return True


def test_snooze_beats_permanent():
    verdict = Rules().classify(SnoozeAndPermanent(30), NOW)
    assert verdict == Verdict("snooze", "Snooze", 30.0)


def test_permanent_beats_transient():
    verdict = Rules(retry_on=(Exception,)).classify(PermanentAndTransient("bad", retry_after=5), NOW)
    assert verdict == Verdict("fail", "Permanent")


def test_snooze_beats_transient():
    class SnoozeAndTransient(Snooze, Transient):
        pass

    assert Rules().classify(SnoozeAndTransient(3), NOW).kind == "snooze"


def test_transient_beats_task_fail_on():
    rules = Rules(fail_on=(Transient, always), default_fail_on=(Exception,))
    assert rules.classify(Transient("flaky"), NOW) == Verdict("retry", "Transient", None)


def test_permanent_beats_task_retry_on():
    rules = Rules(retry_on=(Permanent, always), default_retry_on=(Exception,), unclassified="retry")
    assert rules.classify(Permanent("gone"), NOW) == Verdict("fail", "Permanent")


def test_snooze_beats_task_fail_on():
    assert Rules(fail_on=(Exception,)).classify(Snooze(4), NOW) == Verdict("snooze", "Snooze", 4.0)


def test_task_fail_on_beats_task_retry_on():
    rules = Rules(retry_on=(ValueError,), fail_on=(ValueError,))
    assert rules.classify(ValueError("x"), NOW) == Verdict("fail", "fail_on ValueError")


def test_task_retry_on_beats_default_fail_on():
    rules = Rules(retry_on=(ValueError,), default_fail_on=(ValueError,))
    assert rules.classify(ValueError("x"), NOW) == Verdict("retry", "retry_on ValueError")


def test_default_fail_on_beats_default_retry_on():
    rules = Rules(default_fail_on=(ValueError,), default_retry_on=(ValueError,), unclassified="retry")
    assert rules.classify(ValueError("x"), NOW) == Verdict("fail", "DEFAULT_FAIL_ON ValueError")


def test_default_retry_on_beats_unclassified():
    rules = Rules(default_retry_on=(ValueError,), unclassified="fail")
    assert rules.classify(ValueError("x"), NOW) == Verdict("retry", "DEFAULT_RETRY_ON ValueError")


def test_unclassified_fails_by_default():
    assert Rules().unclassified == "fail"
    assert Rules().classify(ValueError("x"), NOW) == Verdict("fail", 'no rule matched; UNCLASSIFIED is "fail"')


def test_unclassified_retry():
    verdict = Rules(unclassified="retry").classify(ValueError("x"), NOW)
    assert verdict == Verdict("retry", 'no rule matched; UNCLASSIFIED is "retry"')


def test_unclassified_applies_only_when_nothing_matches():
    rules = Rules(retry_on=(KeyError,), fail_on=(TypeError,), unclassified="retry")
    assert rules.classify(KeyError("k"), NOW).rule == "retry_on KeyError"
    assert rules.classify(TypeError("t"), NOW).rule == "fail_on TypeError"
    assert rules.classify(ValueError("v"), NOW).rule == 'no rule matched; UNCLASSIFIED is "retry"'


def test_unclassified_label():
    rules = Rules(unclassified="retry", unclassified_label="self.retry()")
    assert rules.classify(ValueError("x"), NOW) == Verdict("retry", "self.retry()")


@pytest.mark.parametrize("unclassified", ["retr", "ignore", None, True])
def test_bad_unclassified(unclassified):
    with pytest.raises(ConfigurationError, match="unclassified"):
        Rules(unclassified=unclassified)


LAYERS = ("fail_on", "retry_on", "default_fail_on", "default_retry_on")
LAYER_OUTCOME = {
    "fail_on": ("fail", "fail_on"),
    "retry_on": ("retry", "retry_on"),
    "default_fail_on": ("fail", "DEFAULT_FAIL_ON"),
    "default_retry_on": ("retry", "DEFAULT_RETRY_ON"),
}


@settings(max_examples=200, deadline=None)
@given(
    present=st.fixed_dictionaries({layer: st.booleans() for layer in LAYERS}),
    unclassified=st.sampled_from(["retry", "fail"]),
    signal=st.sampled_from([None, "snooze", "permanent", "transient"]),
)
def test_precedence_table(present, unclassified, signal):
    """With every chosen layer matching, the first in the documented order decides."""
    rules = Rules(unclassified=unclassified, **{layer: (Exception,) for layer in LAYERS if present[layer]})
    exception = {
        None: ValueError("plain"),
        "snooze": Snooze(9),
        "permanent": Permanent("bad"),
        "transient": Transient("flaky"),
    }[signal]
    verdict = rules.classify(exception, NOW)
    if signal == "snooze":
        assert (verdict.kind, verdict.rule) == ("snooze", "Snooze")
    elif signal == "permanent":
        assert (verdict.kind, verdict.rule) == ("fail", "Permanent")
    elif signal == "transient":
        assert (verdict.kind, verdict.rule) == ("retry", "Transient")
    else:
        first = next((layer for layer in LAYERS if present[layer]), None)
        if first is None:
            assert verdict == Verdict(unclassified, f'no rule matched; UNCLASSIFIED is "{unclassified}"')
        else:
            kind, source = LAYER_OUTCOME[first]
            assert verdict == Verdict(kind, f"{source} Exception")


def test_always_retry_rules():
    assert ALWAYS_RETRY.classify(ValueError("x"), NOW) == Verdict("retry", "self.retry()")
    assert ALWAYS_RETRY.classify(Permanent("no"), NOW).kind == "fail"
    assert ALWAYS_RETRY.classify(Snooze(2), NOW).kind == "snooze"


# --- matchers ------------------------------------------------------------------------------------


def test_class_matcher_matches_subclasses():
    rules = Rules(retry_on=(OSError,))
    assert rules.classify(ConnectionRefusedError(), NOW) == Verdict("retry", "retry_on OSError")
    assert rules.classify(ValueError(), NOW).kind == "fail"


def test_predicate_matcher_and_its_name():
    def is_flaky(exception):
        return "flaky" in str(exception)

    rules = Rules(retry_on=(is_flaky,))
    assert rules.classify(RuntimeError("flaky db"), NOW) == Verdict("retry", "retry_on is_flaky")
    assert rules.classify(RuntimeError("broken"), NOW).kind == "fail"


def test_first_matcher_in_a_list_names_the_rule():
    rules = Rules(retry_on=(KeyError, LookupError, is_network_error))
    assert rules.classify(KeyError("k"), NOW).rule == "retry_on KeyError"
    assert rules.classify(IndexError(), NOW).rule == "retry_on LookupError"
    assert rules.classify(TimeoutError(), NOW).rule == "retry_on is_network_error"


def test_http_status_rule_name():
    rules = Rules(retry_on=(http_status(429, 503),))
    assert rules.classify(requests_error(503), NOW) == Verdict("retry", "retry_on http_status(429, 503)")
    assert rules.classify(requests_error(404), NOW) == Verdict("fail", 'no rule matched; UNCLASSIFIED is "fail"')


def test_describe_matcher():
    assert describe_matcher(ValueError) == "ValueError"
    assert describe_matcher(http_status(503, 429)) == "http_status(429, 503)"
    assert describe_matcher(is_network_error) == "is_network_error"

    class Callable:
        def __call__(self, exception):
            return True

        def __repr__(self):
            return "<callable>"

    assert describe_matcher(Callable()) == "<callable>"


def test_as_matchers_normalises():
    predicate = is_network_error
    status = http_status(503)
    assert as_matchers(None, name="retry_on") == ()
    assert as_matchers(ValueError, name="retry_on") == (ValueError,)
    assert as_matchers(predicate, name="retry_on") == (predicate,)
    assert as_matchers(status, name="retry_on") == (status,)
    assert as_matchers([ValueError, (KeyError, [status])], name="retry_on") == (ValueError, KeyError, status)


@pytest.mark.parametrize("value", ["ValueError", b"x", 5, [ValueError, "KeyError"], [int]])
def test_as_matchers_rejects_non_matchers(value):
    with pytest.raises(ConfigurationError, match="fail_on"):
        as_matchers(value, name="fail_on")


# --- http_status and status_of ------------------------------------------------------------------


@HTTP_ERRORS
def test_http_status_reads_real_errors(make_error):
    error = make_error(503)
    assert status_of(error) == 503
    assert http_status(503)(error) is True
    assert http_status(429, 503)(error) is True
    assert http_status(429)(error) is False


def test_requests_error_status():
    error = requests_error(429)
    assert isinstance(error.response, requests.Response)
    assert error.response.status_code == 429
    assert http_status(429)(error)


def test_httpx_error_status():
    request = httpx.Request("GET", "http://x")
    error = httpx.HTTPStatusError("too many", request=request, response=httpx.Response(429, request=request))
    assert status_of(error) == 429
    assert http_status(429)(error)
    assert not http_status(503)(error)


def test_urllib_error_status():
    error = urllib.error.HTTPError("http://x", 503, "Service Unavailable", email.message.Message(), None)
    assert status_of(error) == 503
    assert http_status(503)(error)
    assert not http_status(500)(error)


def test_http_status_ranges():
    server_error = http_status(range(500, 600))
    assert all(server_error(requests_error(code)) for code in (500, 503, 599))
    assert not any(server_error(requests_error(code)) for code in (404, 429, 499))
    mixed = http_status(429, range(500, 505))
    assert mixed.codes == frozenset({429, 500, 501, 502, 503, 504})
    assert mixed(httpx_error(429)) and mixed(urllib_error(504)) and not mixed(urllib_error(505))


def test_status_of_without_a_status():
    assert status_of(ValueError("x")) is None
    assert status_of(requests.HTTPError("no response")) is None
    assert not http_status(range(100, 600))(ValueError("x"))
    assert not http_status(range(100, 600))(requests.ConnectionError("down"))


def test_status_of_reads_status_code_attribute():
    class ApiError(Exception):
        status_code = 404

    assert status_of(ApiError()) == 404
    assert http_status(404)(ApiError())


def test_status_of_ignores_unrelated_code_attributes():
    class DbError(Exception):
        code = 503

    class Flagged(Exception):
        status_code = True

    assert status_of(DbError()) is None
    assert status_of(Flagged()) is None
    assert status_of(SystemExit(503)) is None


@pytest.mark.parametrize(
    "codes",
    [(), (99,), (600,), (0,), ("500",), (500.0,), (True,), (range(0, 200),), (range(590, 610),), (429, None)],
)
def test_http_status_rejects_invalid_codes(codes):
    with pytest.raises(ConfigurationError, match="http_status"):
        http_status(*codes)


def test_http_status_equality():
    assert http_status(503, 429) == http_status(429, 503)
    assert http_status(range(500, 502)) == http_status(500, 501)
    assert http_status(429) != http_status(503)
    assert len({http_status(429, 503), http_status(503, 429)}) == 1
    assert repr(http_status(503, 429, 500)) == "http_status(429, 500, 503)"


# --- Retry-After --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("120", 120.0), (" 7 ", 7.0), ("0", 0.0), (30, 30.0)])
def test_retry_after_delta_seconds(value, seconds, caplog):
    with caplog.at_level(logging.DEBUG, logger="safetynet"):
        assert parse_retry_after(value, NOW) == seconds
    assert not caplog.records


def test_retry_after_http_date_in_the_future():
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    when = datetime(2015, 10, 21, 7, 28, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(date, when - 90) == 90.0
    assert parse_retry_after("Wed, 21 Oct 2015 09:28:00 +0200", when - 90) == 90.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000", when - 90) == 90.0  # naive: UTC
    assert parse_retry_after(date, when - 0.5) == 0.5


def test_retry_after_http_date_in_the_past_is_zero():
    when = datetime(2015, 10, 21, 7, 28, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", when + 3600) == 0.0


def test_http_date_helper_round_trips():
    now = datetime.fromtimestamp(NOW, timezone.utc)
    header = http_date(now + timedelta(seconds=45))
    assert header.endswith("GMT")
    assert parse_retry_after(header, NOW) == 45.0


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "", "   ", "Wed, 99 Foo 2015 07:28:00 GMT", "5 seconds"])
def test_garbage_retry_after_is_ignored_with_a_log_line(value, caplog):
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        assert parse_retry_after(value, NOW) is None
    records = [r for r in caplog.records if r.name == "safetynet"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert "Retry-After" in records[0].getMessage()
    assert repr(value.strip()) in records[0].getMessage()


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b3", "\u2460"])
def test_unicode_digit_retry_after_is_ignored(value, caplog):
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        assert parse_retry_after(value, NOW) is None
    assert any(r.name == "safetynet" for r in caplog.records)


@HTTP_ERRORS
def test_unicode_digit_retry_after_header_does_not_crash_classification(make_error):
    value = "\u00b2"
    if make_error is httpx_error:  # httpx takes the raw byte a server sent and decodes it itself
        value = value.encode("latin-1")
    error = make_error(503, {"Retry-After": value})
    assert Rules(retry_on=(http_status(503),)).classify(error, NOW) == Verdict("retry", "retry_on http_status(503)")


def test_missing_retry_after_is_none_without_a_log_line(caplog):
    with caplog.at_level(logging.DEBUG, logger="safetynet"):
        assert parse_retry_after(None, NOW) is None
        assert retry_after_of(requests_error(503), NOW) is None
        assert retry_after_of(ValueError("x"), NOW) is None
    assert not caplog.records


@HTTP_ERRORS
def test_retry_after_read_from_each_library(make_error):
    assert retry_after_of(make_error(429, {"Retry-After": "30"}), NOW) == 30.0
    assert retry_after_of(make_error(503, {"retry-after": "12"}), NOW) == 12.0


@HTTP_ERRORS
def test_retry_after_date_read_from_each_library(make_error):
    header = http_date(datetime.fromtimestamp(NOW + 120, timezone.utc))
    assert retry_after_of(make_error(503, {"Retry-After": header}), NOW) == 120.0


@HTTP_ERRORS
def test_garbage_retry_after_header_ignored_with_log(make_error, caplog):
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        assert retry_after_of(make_error(503, {"Retry-After": "later"}), NOW) is None
    assert any(r.name == "safetynet" and "later" in r.getMessage() for r in caplog.records)


def test_urllib_error_with_plain_dict_headers():
    error = urllib.error.HTTPError("http://x", 503, "busy", {"retry-after": "8"}, None)
    assert retry_after_of(error, NOW) == 8.0


def test_transient_retry_after_is_honoured():
    assert retry_after_of(Transient("slow down", retry_after=12), NOW) == 12.0
    assert retry_after_of(Transient("slow down"), NOW) is None
    verdict = Rules().classify(Transient("slow down", retry_after=2.5), NOW)
    assert verdict == Verdict("retry", "Transient", 2.5)


def test_transient_carrying_a_response_falls_back_to_its_header():
    error = Transient("rate limited")
    error.response = requests_error(429, {"Retry-After": "40"}).response
    assert retry_after_of(error, NOW) == 40.0
    explicit = Transient("rate limited", retry_after=5)
    explicit.response = error.response
    assert retry_after_of(explicit, NOW) == 5.0


def test_retry_verdicts_carry_retry_after_and_fail_verdicts_do_not():
    error = requests_error(429, {"Retry-After": "60"})
    assert Rules(retry_on=(http_status(429),)).classify(error, NOW).retry_after == 60.0
    assert Rules(default_retry_on=(http_status(429),)).classify(error, NOW).retry_after == 60.0
    assert Rules(unclassified="retry").classify(error, NOW).retry_after == 60.0
    assert Rules(fail_on=(http_status(429),)).classify(error, NOW).retry_after is None
    assert Rules().classify(error, NOW).retry_after is None


def test_headers_object_that_breaks_is_ignored():
    class BrokenHeaders:
        def get(self, name):
            raise RuntimeError("boom")

    class Weird(Exception):
        headers = BrokenHeaders()

    class NoGet(Exception):
        headers = ("Retry-After", "5")

    assert retry_after_of(Weird(), NOW) is None
    assert retry_after_of(NoGet(), NOW) is None


# --- network errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exception",
    [
        ConnectionError("x"),
        ConnectionRefusedError("x"),
        ConnectionResetError("x"),
        TimeoutError("x"),
        socket.timeout("x"),
        requests.ConnectionError("x"),
        requests.Timeout("x"),
        requests.ReadTimeout("x"),
        requests.ConnectTimeout("x"),
        httpx.ConnectError("x"),
        httpx.ReadTimeout("x"),
        httpx.RemoteProtocolError("x"),
        urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")),
        urllib.error.URLError(TimeoutError("timed out")),
    ],
    ids=lambda e: f"{type(e).__module__}.{type(e).__name__}",
)
def test_is_network_error(exception):
    assert is_network_error(exception) is True
    assert Rules(retry_on=(is_network_error,)).classify(exception, NOW).kind == "retry"


@pytest.mark.parametrize(
    "exception",
    [
        ValueError("x"),
        Exception("x"),
        OSError("x"),
        requests_error(503),
        httpx_error(503),
        urllib_error(503),
        urllib.error.URLError("unknown url type: htp"),
        type("ConnectionError", (Exception,), {"__module__": "mylib"})("spoof"),
    ],
    ids=lambda e: f"{type(e).__module__}.{type(e).__name__}",
)
def test_is_not_network_error(exception):
    assert is_network_error(exception) is False


# --- the signals: validation and pickling --------------------------------------------------------


def test_signal_hierarchy():
    for cls in (Transient, Permanent, Snooze):
        assert issubclass(cls, TaskSignal)
        assert issubclass(cls, SafetynetError)
    assert str(Transient("flaky")) == "flaky"
    assert str(Snooze(5)) == "snoozed for 5s"
    assert Snooze(5, "later").message == "later"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_transient_pickles_with_retry_after(protocol):
    copy = pickle.loads(pickle.dumps(Transient("rate limited", retry_after=30), protocol=protocol))
    assert type(copy) is Transient
    assert (copy.message, copy.retry_after, str(copy)) == ("rate limited", 30.0, "rate limited")
    plain = pickle.loads(pickle.dumps(Transient("flaky"), protocol=protocol))
    assert (plain.message, plain.retry_after) == ("flaky", None)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_permanent_pickles(protocol):
    copy = pickle.loads(pickle.dumps(Permanent("row deleted"), protocol=protocol))
    assert type(copy) is Permanent
    assert (copy.message, str(copy)) == ("row deleted", "row deleted")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_snooze_pickles_with_delay(protocol):
    copy = pickle.loads(pickle.dumps(Snooze(45, "waiting for upstream"), protocol=protocol))
    assert type(copy) is Snooze
    assert (copy.delay, copy.message) == (45.0, "waiting for upstream")
    default = pickle.loads(pickle.dumps(Snooze(2.5), protocol=protocol))
    assert (default.delay, str(default)) == (2.5, "snoozed for 2.5s")


def test_pickled_signals_classify_the_same():
    for signal in (Transient("t", retry_after=3), Permanent("p"), Snooze(7)):
        copy = pickle.loads(pickle.dumps(signal))
        assert Rules().classify(copy, NOW) == Rules().classify(signal, NOW)


@pytest.mark.parametrize("delay", [-1, -0.1, "5", None, True])
def test_snooze_rejects_bad_delay(delay):
    with pytest.raises(ConfigurationError, match=r"Snooze\.delay"):
        Snooze(delay)


@pytest.mark.parametrize("retry_after", [-1, -0.1, "5"])
def test_transient_rejects_bad_retry_after(retry_after):
    with pytest.raises(ConfigurationError, match=r"Transient\.retry_after"):
        Transient("x", retry_after=retry_after)


@pytest.mark.parametrize(
    "make",
    [lambda: Snooze(float("nan")), lambda: Transient("x", retry_after=float("nan"))],
    ids=["snooze", "transient"],
)
def test_signals_reject_nan(make):
    with pytest.raises(ConfigurationError):
        make()


def test_transient_rejects_bool_retry_after():
    with pytest.raises(ConfigurationError, match=r"Transient\.retry_after"):
        Transient("x", retry_after=True)
