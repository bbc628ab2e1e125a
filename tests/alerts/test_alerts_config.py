"""[alerts] settings: webhook URLs and the signing secret are checked at load."""

from __future__ import annotations

import pytest

from ratelimitd.config import AlertsConfig, ConfigError, parse_config

SECRET = "whsec-0123456789abcdef"


def alerts(**table):
    return parse_config({"alerts": table}, "test.toml").alerts


def test_defaults_need_no_webhook_and_no_secret():
    assert alerts() == AlertsConfig()
    assert AlertsConfig().queue_size > 0 and AlertsConfig().stream_max_len > 0


def test_webhooks_with_a_secret_load():
    config = alerts(webhooks=["https://hooks.example.com/x?token=1", "http://10.0.0.1:8080/"],
                    webhook_secret=SECRET, retry_max_s=30)
    assert config.webhooks[1] == "http://10.0.0.1:8080/" and config.retry_max_s == 30


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://", "https:///path",
                                 "example.com/hook", "http://exa mple.com/",
                                 "http://example.com:99999/", "http://[::1/"])
def test_a_bad_webhook_url_is_an_error_naming_it(url):
    with pytest.raises(ConfigError, match=r"test.toml: alerts.webhooks.1: must be an http"):
        alerts(webhooks=["https://ok.example.com/", url], webhook_secret=SECRET)


def test_a_bad_webhook_url_is_named_by_index_not_by_its_text_which_may_hold_a_token():
    with pytest.raises(ConfigError) as error:
        alerts(webhooks=["ftp://hooks.example.com/x?token=tok-4711"], webhook_secret=SECRET)
    assert "tok-4711" not in str(error.value) and "hooks.example.com" not in str(error.value)


def test_a_webhook_listed_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"alerts\.webhooks.1: is listed twice"):
        alerts(webhooks=["https://a.example.com/", "https://a.example.com/"],
               webhook_secret=SECRET)


def test_webhooks_need_a_secret_of_some_length():
    with pytest.raises(ConfigError, match=r"alerts\.webhook_secret: webhooks are signed"):
        alerts(webhooks=["https://a.example.com/"])
    with pytest.raises(ConfigError, match=r"alerts\.webhook_secret: must be at least 16"):
        alerts(webhooks=["https://a.example.com/"], webhook_secret="short")


def test_the_secret_may_come_from_the_environment(monkeypatch):
    with pytest.raises(ConfigError, match=r"alerts\.webhook_secret: environment variable"):
        alerts(webhooks=["https://a.example.com/"], webhook_secret="env:RL_TEST_WEBHOOK")
    monkeypatch.setenv("RL_TEST_WEBHOOK", SECRET)
    assert alerts(webhooks=["https://a.example.com/"],
                  webhook_secret="env:RL_TEST_WEBHOOK").webhook_secret == "env:RL_TEST_WEBHOOK"


@pytest.mark.parametrize("key", ["queue_size", "retry_max_s", "delivery_max_age_s",
                                 "stream_max_len", "webhook_timeout_ms"])
def test_delivery_knobs_must_be_positive(key):
    with pytest.raises(ConfigError, match=rf"alerts\.{key}: must be at least 1"):
        alerts(**{key: 0})
