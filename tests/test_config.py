"""The daemon's own config file: every field parsed, every bad one named."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest

from edgeproxy.config import ConfigError, parse_config
from edgeproxy.proxy import ProxySettings

BASE: dict[str, Any] = {"instance": "edge-ord", "role": "edge", "host_id": "edge-ord",
                        "state": {"source": "file", "path": "/etc/edgeproxy/state.yaml"}}


def test_defaults_and_http_section() -> None:
    config = parse_config(BASE)
    # one HTTP process per CPU unless the config says otherwise
    assert config.http == dataclasses.replace(ProxySettings(), processes=os.cpu_count() or 1)
    assert config.metrics_listen == "127.0.0.1:9109"
    assert parse_config({**BASE, "http": {"processes": 1}}).http == ProxySettings()
    assert parse_config({**BASE, "http": {"queue_limit": 3}}).http.processes == os.cpu_count()
    config = parse_config({**BASE, "http": {"app_cpu_limit": 0.25, "queue_limit": 10,
                                            "response_timeout": 5}})
    assert config.http.app_cpu_limit == 0.25 and config.http.queue_limit == 10
    assert config.http.response_timeout == 5.0 and isinstance(config.http.response_timeout, float)
    assert config.http.header_timeout == ProxySettings().header_timeout


@pytest.mark.parametrize(("http", "message"), [
    ({"app_cpu_limt": 0.5}, "http.app_cpu_limt: unknown key (known: app_cpu_limit, "),
    ({"queue_limit": 1.5}, "http.queue_limit: expected an integer >= 0, got a number"),
    ({"queue_limit": True}, "http.queue_limit: expected an integer >= 0, got a boolean"),
    ({"header_timeout": "soon"}, "http.header_timeout: 'soon' is not a duration"),
    ({"idle_timeout": -1}, "http.idle_timeout: -1: a duration must be a finite number >= 0"),
    ({"app_cpu_limit": "1s"}, "http.app_cpu_limit: expected a number >= 0, got a string"),
    ({"app_cpu_limit": 0.05}, "http: app_cpu_limit must be 0 (off) or at least 0.1"),
    ({"processes": 0}, "http: processes must be at least 1"),
    ([1, 2], "http: expected a mapping, got a list"),
])
def test_bad_http_settings_are_named(http: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "http": http})
    assert str(err.value).startswith(message) and len(err.value.problems) == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"role": "router"}, "role: 'router' is not one of edge, worker, both"),
    ({"refuse": "reject"}, "refuse: 'reject' is not rst or drop"),
    ({"attach": "skb"}, "attach: 'skb' is not xdp or tc"),
    ({"colour": "blue"}, "colour: unknown key (known: attach, host_id, http, "),
    ({"host_id": 7}, "host_id: expected a non-empty string, got an integer"),
])
def test_bad_top_level_fields_are_named(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **change})
    assert str(err.value).startswith(message) and len(err.value.problems) == 1
