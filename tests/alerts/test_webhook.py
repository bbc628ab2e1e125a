"""A webhook's name in the logs and its consumer group (webhook.py)."""

from __future__ import annotations

from ratelimitd.alerts.webhook import webhook_group, webhook_label


def test_a_webhook_is_logged_without_its_path_query_or_credentials() -> None:
    url = "https://user:token@hooks.example:8443/path/secret?key=abc"
    label = webhook_label(url)
    assert label == f"https://hooks.example:8443 ({webhook_group(url)})"
    assert "secret" not in label and "abc" not in label and "token" not in label


def test_each_url_has_its_own_group() -> None:
    assert webhook_group("https://a.example/x") != webhook_group("https://a.example/y")
    assert webhook_group("https://a.example/x") == webhook_group("https://a.example/x")
