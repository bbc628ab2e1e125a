"""Configuration: every key defaulted, a full commented example accepted, every mistake named
by file and dotted key, and `ratelimitd check-config` as an operator runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ratelimitd.config import Config, ConfigError, load_config, parse_config
from ratelimitd.policy import Limit, ModelPrice, Tier, default_tiers
from ratelimitd.units import NANO_PER_USD

RATELIMITD = Path(sys.executable).parent / "ratelimitd"

# A full configuration file as an operator writes one: every section, with comments.
FULL_EXAMPLE = '''\
[server]
listen = ["127.0.0.1:8080"]            # "host:port" or "unix:/run/ratelimitd/ratelimitd.sock"
service_tokens = []                    # bearer tokens gateways present; "env:NAME" reads a variable
admin_tokens = []                      # bearer tokens for /v1/admin/*
shadow_mode = false                    # true: every limit is evaluated and reported but never denies
max_body_bytes = 1048576

[redis]
url = ""                               # "" = embedded: the daemon starts its own redis-server
data_dir = ""                          # embedded Redis files; "" = $STATE_DIRECTORY or ~/.local/state/ratelimitd
mode = "standalone"                    # standalone | cluster | sentinel
timeout_ms = 100                       # per call; past it the failure policy applies
on_error = "deny"                      # deny (503) | allow (admit, flagged in the response)

[reservations]
ttl_s = 300                            # an uncommitted reservation expires; its estimate stays charged

[tokens]
default_encoding = "o200k_base"        # tiktoken encoding for models not mapped below
# models = { "gpt-4" = "cl100k_base" }

[pricing]                              # USD per 1M tokens
unknown_model = "default"              # "default": priced as `default`; "deny": 400 unknown_model
default = { input = 3.0, output = 15.0 }
"gpt-4" = { input = 30.0, output = 60.0 }
"gpt-3.5-turbo" = { input = 1.5, output = 2.0 }
"claude-3-opus" = { input = 15.0, output = 75.0 }
"gpt-4o" = { input = 2.5, output = 10.0, cached_input = 1.25 }

[tiers.free]                           # the seed's shorthand; each line becomes a limit
requests_per_minute = 10               # sliding 60 s, scope user, metric requests
tokens_per_day = 10000                 # sliding 24 h, scope user, metric tokens (input+output)
max_output_tokens = 500                # cap granted per call
daily_budget_usd = 1.0                 # calendar day (timezone below), scope user, metric cost
max_concurrent = 2                     # in-flight reservations, scope user
max_prompt_chars = 10000
max_input_tokens = 4000

[[tiers.free.limits]]                  # general form, any number
name = "tokens_per_hour"
scope = "user"                         # key | user | org | ip | ip_prefix | global | any attribute name
metric = "tokens"                      # requests | tokens | input_tokens | output_tokens | cost_usd | concurrent
window = "1h"                          # sliding duration ("90s", "1h", "24h") or "day" / "month" (calendar)
limit = 100000
algorithm = "sliding"                  # sliding | token_bucket (then: burst = N)
shadow = false                         # true: counted and reported ("shadow": true in answers), never denies

[calendar]
timezone = "UTC"

[keys]
max_age_days = 90                      # older keys answer 403 key_expired
warn_days = 14                         # a warning rides on every reserve in the last days
rotation_grace_s = 86400               # a rotated key keeps working this long

[abuse]
auth_failures_per_ip = 20              # failed key lookups per ip per 10 min, then
block_s = 900                          # that ip is blocked (403 blocked) this long
signature_max_age_s = 300              # signed requests: freshness window; nonces kept as long

[anomaly]
action = "alert"                       # alert | block (also per tier: anomaly = "alert" | "block" | false)
min_history_hours = 24                 # no spike decision before this many active hours of baseline
request_spike_factor = 5.0             # requests/hour over 5x the subject's baseline: alert (or block)
token_spike_factor = 3.0               # tokens/request over 3x the baseline: alert
block_s = 900

[alerts]
thresholds = [0.5, 0.8, 1.0]           # of any cost budget: warning, critical, limit; once per period
webhooks = []                          # URLs that receive each alert as signed JSON
'''  # noqa: E501  (comments aligned as an operator's file has them)


def write(tmp_path: Path, text: str, name: str = "ratelimitd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def summary(tier: Tier) -> dict[str, tuple[Any, ...]]:
    """name -> (scope, metric, algorithm, window, limit) of each of a tier's limits."""
    return {lim.name: (lim.scope, lim.metric, lim.algorithm, lim.window_ms or lim.period or None,
                       lim.limit) for lim in tier.limits}


# -- defaults ----------------------------------------------------------------------------------

def test_no_config_and_an_empty_config_give_every_default(tmp_path: Path) -> None:
    empty = load_config(write(tmp_path, ""))
    comments_only = load_config(write(tmp_path, "# nothing here\n\n", "c.toml"))
    for config in (load_config(None), parse_config({}), empty, comments_only):
        assert config.server.listen == ("127.0.0.1:8080",)
        assert config.server.service_tokens == () and config.server.admin_tokens == ()
        assert config.server.max_body_bytes == 1_048_576
        assert (config.redis.url, config.redis.data_dir, config.redis.mode,
                config.redis.timeout_ms, config.redis.on_error) == ("", "", "standalone", 100,
                                                                    "deny")
        assert config.reservations.ttl_s == 300
        assert config.reservations.min_output_tokens == 16
        assert config.tokens.default_encoding == "o200k_base" and dict(config.tokens.models) == {}
        assert config.pricing.unknown_model == "default"
        assert config.pricing.default == ModelPrice(3.0, 15.0)
        assert dict(config.pricing.models) == {
            "gpt-4": ModelPrice(30.0, 60.0), "gpt-3.5-turbo": ModelPrice(1.5, 2.0),
            "claude-3-opus": ModelPrice(15.0, 75.0), "gpt-4o": ModelPrice(2.5, 10.0, 1.25)}
        assert config.calendar.timezone == "UTC"
        assert (config.keys.max_age_days, config.keys.warn_days,
                config.keys.rotation_grace_s) == (90, 14, 86_400)
        assert (config.abuse.auth_failures_per_ip, config.abuse.block_s,
                config.abuse.signature_max_age_s) == (20, 900, 300)
        assert (config.anomaly.request_spike_factor, config.anomaly.token_spike_factor,
                config.anomaly.block_s) == (5.0, 3.0, 900)
        assert (config.anomaly.action, config.anomaly.min_history_hours) == ("alert", 24)
        assert config.alerts.thresholds == (0.5, 0.8, 1.0) and config.alerts.webhooks == ()
    assert empty.source == str(tmp_path / "ratelimitd.toml")


def test_the_seed_tiers() -> None:
    tiers = parse_config({}).tiers
    assert list(tiers) == ["free", "pro", "enterprise"]
    nano = NANO_PER_USD
    for name, rpm, tpd, max_out, usd, chars in (
            ("free", 10, 10_000, 500, 1, 100_000), ("pro", 60, 100_000, 4_000, 50, 600_000),
            ("enterprise", 300, 1_000_000, 8_000, 500, 1_000_000)):
        tier = tiers[name]
        assert tier.max_output_tokens == max_out
        assert tier.max_prompt_chars == chars
        limits = summary(tier)
        assert limits["requests_per_minute"] == ("user", "requests", "sliding", 60_000, rpm)
        assert limits["tokens_per_day"] == ("user", "tokens", "sliding", 86_400_000, tpd)
        assert limits["daily_budget_usd"] == ("user", "cost_usd", "calendar", "day", usd * nano)


def test_the_shorthand_spelled_out_is_the_seed() -> None:
    config = parse_config({"tiers": {"free": {
        "requests_per_minute": 10, "tokens_per_day": 10_000, "max_output_tokens": 500,
        "daily_budget_usd": 1.0, "max_concurrent": 2, "max_prompt_chars": 100_000}}})
    assert config.tiers["free"] == default_tiers()["free"]


def test_named_tiers_replace_the_seed_and_omitted_shorthand_means_no_limit() -> None:
    config = parse_config({"tiers": {"hobby": {"requests_per_minute": 3},
                                     "batch-2.0": {"tokens_per_day": 5}}})
    assert list(config.tiers) == ["hobby", "batch-2.0"]
    assert summary(config.tiers["hobby"]) == {
        "requests_per_minute": ("user", "requests", "sliding", 60_000, 3)}
    assert config.tiers["hobby"].max_output_tokens is None
    assert config.tiers["hobby"].max_prompt_chars is None
    assert config.tiers["hobby"].max_input_tokens is None
    assert summary(parse_config({"tiers": {"open": {}}}).tiers["open"]) == {}


def test_sections_merge_with_defaults() -> None:
    config = parse_config({"redis": {"on_error": "allow"}, "pricing": {"my-model": {
        "input": 1, "output": 2}}})
    assert config.redis.on_error == "allow" and config.redis.timeout_ms == 100
    assert config.pricing.models["my-model"] == ModelPrice(1.0, 2.0)
    assert config.pricing.models["gpt-4o"] == ModelPrice(2.5, 10.0, 1.25)   # still there
    assert config.pricing.models["my-model"].input == 1.0
    assert isinstance(config.pricing.models["my-model"].input, float)


# -- a full example ----------------------------------------------------------------------------

def test_a_full_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    config = load_config(path)
    assert config.source == str(path)
    assert config.server.listen == ("127.0.0.1:8080",)
    assert config.pricing.default == ModelPrice(3.0, 15.0)
    assert config.pricing.models["gpt-4"] == ModelPrice(30.0, 60.0)
    assert config.pricing.models["gpt-3.5-turbo"] == ModelPrice(1.5, 2.0)
    assert config.pricing.models["claude-3-opus"] == ModelPrice(15.0, 75.0)
    assert config.pricing.models["gpt-4o"] == ModelPrice(2.5, 10.0, 1.25)
    assert list(config.tiers) == ["free"]
    free = config.tiers["free"]
    assert (free.max_output_tokens, free.max_prompt_chars, free.max_input_tokens) == \
        (500, 10_000, 4_000)
    assert summary(free) == {
        "requests_per_minute": ("user", "requests", "sliding", 60_000, 10),
        "tokens_per_day": ("user", "tokens", "sliding", 86_400_000, 10_000),
        "daily_budget_usd": ("user", "cost_usd", "calendar", "day", NANO_PER_USD),
        "max_concurrent": ("user", "concurrent", "sliding", None, 2),
        "tokens_per_hour": ("user", "tokens", "sliding", 3_600_000, 100_000),
    }
    # everything else of the example is the default
    assert config == Config(tiers=config.tiers, source=config.source)


def test_the_general_limit_forms(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '''
[attributes]
names = ["device"]

[tiers.team]
max_output_tokens = 1000
[[tiers.team.limits]]
name = "burst"
scope = "org"
metric = "requests"
window = "1s"
limit = 5
algorithm = "token_bucket"
burst = 20
[[tiers.team.limits]]
name = "monthly_spend"
scope = "org"
metric = "cost_usd"
window = "month"
limit = 250.5
[[tiers.team.limits]]
name = "per_device"
scope = "device"
metric = "input_tokens"
window = "90s"
limit = 7000
[[tiers.team.limits]]
name = "in_flight"
scope = "global"
metric = "concurrent"
limit = 100
'''))
    by_name = {lim.name: lim for lim in config.tiers["team"].limits}
    assert by_name["burst"] == Limit("burst", "org", "requests", 5, "token_bucket",
                                     window_ms=1000, burst=20)
    assert by_name["monthly_spend"] == Limit("monthly_spend", "org", "cost_usd",
                                             250_500_000_000, "calendar", period="month")
    assert by_name["per_device"].scope == "device"
    assert by_name["per_device"].window_ms == 90_000 and by_name["per_device"].limit == 7000
    assert by_name["in_flight"].metric == "concurrent" and by_name["in_flight"].limit == 100


def test_env_service_tokens_are_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ratelimitd.config import resolve_tokens
    monkeypatch.setenv("RL_CFG_TEST_TOKEN", "s3cr3t-from-the-env")
    config = load_config(write(tmp_path, '[server]\nservice_tokens = ["env:RL_CFG_TEST_TOKEN", '
                                         '"literal-0123456789"]\n'))
    assert resolve_tokens(config.server.service_tokens) == (b"s3cr3t-from-the-env",
                                                            b"literal-0123456789")
    monkeypatch.delenv("RL_CFG_TEST_TOKEN")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "ratelimitd.toml")
    assert str(caught.value) == (f"{tmp_path / 'ratelimitd.toml'}: server.service_tokens.0: "
                                 "environment variable RL_CFG_TEST_TOKEN is not set (line 2)")


# -- mistakes, named by file and key ----------------------------------------------------------

BAD_CONFIGS: list[tuple[str, str, str]] = [
    # (TOML, dotted key the message names, something it says)
    ('[server]\nlisen = ["0.0.0.0:80"]\n', "server.lisen", "unknown key"),
    ("[serverr]\n", "serverr", "unknown key"),
    ('[redis]\nmode = "clustr"\n', "redis.mode", "standalone, cluster, sentinel"),
    ('[redis]\non_error = "maybe"\n', "redis.on_error", "deny, allow"),
    ('[redis]\ntimeout_ms = "100"\n', "redis.timeout_ms", "whole number"),
    ("[redis]\ntimeout_ms = 0\n", "redis.timeout_ms", "at least 1"),
    ("[redis]\ntimeout_ms = -5\n", "redis.timeout_ms", "negative"),
    ('[redis]\nmode = "cluster"\n', "redis.url", "cluster"),
    ('[redis]\nmode = "sentinel"\nurl = "redis://h:6379"\n', "redis.url", "redis+sentinel://"),
    ("[server]\nmax_body_bytes = 10\n", "server.max_body_bytes", "1024"),
    ('[server]\nlisten = ["localhost"]\n', "server.listen.0", "host:port"),
    ('[server]\nlisten = ["127.0.0.1:99999"]\n', "server.listen.0", "65535"),
    ('[server]\nlisten = "127.0.0.1:80"\n', "server.listen", "array"),
    ("[server]\nlisten = []\n", "server.listen", "at least one"),
    ('[server]\nservice_tokens = [""]\n', "server.service_tokens.0", "empty token"),
    ('[server]\nservice_tokens = ["fifteen-bytes!!"]\n', "server.service_tokens.0",
     "shorter than 16 bytes"),
    ('[server]\nadmin_tokens = ["file:/etc/admin"]\n', "server.admin_tokens.0", "'file:'"),
    ('[server]\nadmin_tokens = ["credential:admin_tokens"]\n', "server.admin_tokens.0",
     "CREDENTIALS_DIRECTORY is not set"),
    ('[keys]\npepper = "vault:pepper"\n', "keys.pepper", "'vault:'"),
    ('[keys]\npepper = "too-short-a-pepper"\n', "keys.pepper", "at least 32 bytes"),
    ("server = 5\n", "server", "table"),
    ('[pricing]\n"gpt-4" = { input = "x", output = 60.0 }\n', "pricing.gpt-4.input", "number"),
    ('[pricing]\n"my-model" = { input = 1.0 }\n', "pricing.my-model", "needs output"),
    ('[pricing]\n"gpt-4o" = { input = 1, output = 2, cache = 1 }\n', "pricing.gpt-4o.cache",
     "unknown key"),
    ("[pricing]\ndefault = { input = -1.0, output = 2.0 }\n", "pricing.default.input",
     "between 0"),
    ('[pricing]\nunknown_model = "reject"\n', "pricing.unknown_model", "default or deny"),
    ('[pricing]\n"gpt-4" = 30\n', "pricing.gpt-4", "table"),
    ('[tiers.free]\nrpm = 10\n', "tiers.free.rpm", "unknown key"),
    ("[tiers.free]\nrequests_per_minute = 0\n", "tiers.free.requests_per_minute", "positive"),
    ("[tiers.free]\nrequests_per_minute = 1.5\n", "tiers.free.requests_per_minute",
     "whole number"),
    ('[tiers.free]\ndaily_budget_usd = "1"\n', "tiers.free.daily_budget_usd", "number"),
    ("[tiers.free]\nmax_output_tokens = -1\n", "tiers.free.max_output_tokens", "positive"),
    ("[tiers]\n", "tiers", "at least one tier"),
    ('[tiers."free plan"]\n', "tiers.free plan", "tier names"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 5\nwindow = "1x"\n',
     "tiers.free.limits[0].window", "bad duration"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 5\n',
     "tiers.free.limits[0].window", "bad duration"),
    ('[[tiers.free.limits]]\nname = "a"\nmetric = "requests"\nlimit = 1\nwindow = "1m"\n'
     '[[tiers.free.limits]]\nname = "t"\nmetric = "tokenz"\nlimit = 5\nwindow = "1h"\n',
     "tiers.free.limits[1].metric", "requests, tokens"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 0\nwindow = "1h"\n',
     "tiers.free.limits[0].limit", "1 to"),
    ('[[tiers.free.limits]]\nmetric = "tokens"\nlimit = 5\nwindow = "1h"\n',
     "tiers.free.limits[0]", "needs name"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 5\nwindow = "1h"\n'
     'colour = "red"\n', "tiers.free.limits[0].colour", "unknown key"),
    ('[[tiers.free.limits]]\nname = "t"\nscope = "Team"\nmetric = "tokens"\nlimit = 5\n'
     'window = "1h"\n', "tiers.free.limits[0].scope", "unknown scope 'Team'"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 5\nwindow = "1h"\n'
     'burst = 9\n', "tiers.free.limits[0].burst", "token_bucket"),
    ('[[tiers.free.limits]]\nname = "c"\nmetric = "concurrent"\nlimit = 5\nwindow = "1h"\n',
     "tiers.free.limits[0]", "concurrent"),
    ('[[tiers.free.limits]]\nname = "d"\nmetric = "cost_usd"\nlimit = 5\nwindow = "day"\n'
     'algorithm = "token_bucket"\n', "tiers.free.limits[0].window", "calendar"),
    ('[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 5\nwindow = "1h"\n'
     '[[tiers.free.limits]]\nname = "t"\nmetric = "tokens"\nlimit = 6\nwindow = "1h"\n',
     "tiers.free.limits", "share a name"),
    ('[tiers.free]\nlimits = { name = "t" }\n', "tiers.free.limits", "array of tables"),
    ('[calendar]\ntimezone = "Mars/Olympus_Mons"\n', "calendar.timezone", "unknown timezone"),
    ("[alerts]\nthresholds = [0.5, 1.5]\n", "alerts.thresholds", "(0, 1]"),
    ('[alerts]\nthresholds = ["half"]\n', "alerts.thresholds.0", "number"),
    ("[reservations]\nttl_s = 0\n", "reservations.ttl_s", "from 1 to 604800 seconds"),
    ('[tokens]\ndefault_encoding = "nope_base"\n', "tokens.default_encoding", "nope_base"),
    ('[tokens]\nmodels = { "my-llm" = "p99k_base" }\n', "tokens.models.my-llm", "p99k_base"),
    ('[tokens]\nmodels = { "my-llm" = 5 }\n', "tokens.models.my-llm", "string"),
    ('[keys]\nmax_age_days = -1\n', "keys.max_age_days", "negative"),
    ('[anomaly]\nrequest_spike_factor = "x"\n', "anomaly.request_spike_factor", "number"),
    ('[anomaly]\naction = "ban"\n', "anomaly.action", "alert or block"),
    ("[anomaly]\nmin_history_hours = 256\n", "anomaly.min_history_hours", "from 0 to 255"),
    ('[tiers.free]\nanomaly = "ban"\n', "tiers.free.anomaly", 'true, false, "alert" or "block"'),
]


@pytest.mark.parametrize(("toml", "key", "says"), BAD_CONFIGS,
                         ids=[f"{k}-{s}" for _, k, s in BAD_CONFIGS])
def test_a_bad_config_names_the_file_and_the_key(tmp_path: Path, toml: str, key: str,
                                                 says: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert says in message, message


def test_unreadable_or_malformed_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read")):
        load_config(missing)
    broken = write(tmp_path, '[server\nlisten = "x"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: not valid TOML")):
        load_config(broken)


def test_good_listen_addresses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[server]\nlisten = ["0.0.0.0:8080", "[::1]:65535", '
                                         '"unix:/run/ratelimitd/ratelimitd.sock"]\n'))
    assert len(config.server.listen) == 3


# -- ratelimitd check-config ------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RATELIMITD), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    done = run_cli("check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: ok"), done.stdout
    assert "free" in done.stdout


def test_check_config_refuses_a_bad_file_with_the_key_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE.replace('mode = "standalone"', 'mode = "single"'))
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{path}: redis.mode: must be one of standalone, cluster, sentinel" in done.stderr
    assert "Traceback" not in done.stderr
    missing = run_cli("check-config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_a_tier_takes_the_anomaly_action_or_one_of_its_own() -> None:
    config = parse_config({"anomaly": {"action": "block", "min_history_hours": 0},
                           "tiers": {"a": {}, "b": {"anomaly": "alert"}, "c": {"anomaly": False}}})
    assert (config.anomaly.action, config.anomaly.min_history_hours) == ("block", 0)
    assert [config.tiers[t].anomaly for t in "abc"] == [True, "alert", False]


def test_every_mistake_of_the_tiers_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"tiers": {"free": 5, "pro": {"requests_per_minute": "x", "max_concurrent": 0,
                                                   "limits": [{"name": "l", "metric": "nope"}]}},
                      "server": {"listen": "x", "bogus": 1}})
    lines = str(caught.value).splitlines()
    for key in ("tiers.free: must be a table", "tiers.pro.requests_per_minute",
                "tiers.pro.max_concurrent", "tiers.pro.limits[0]", "server.listen",
                "server.bogus"):
        assert sum(key in line for line in lines) == 1, (key, lines)
