"""Locust load test of ratelimitd: honest gateway traffic beside three kinds of attacker.

Run through `bash loadtests/run.sh [seconds]`, which starts a daemon with the configuration
these classes expect (tiers `gateway` and `free`, each with an `ip_prefix` limit named
`network_requests_per_minute`) and then checks the answers with `loadtests/verify.py`.

Every answer the daemon gives is written, one JSON object per line, to $LOADTEST_ANSWERS:
who asked, when (client time before sending, t0, and after the answer, t1), the status, and
for a grant what it reserved; for a commit what it charged. The verifier proves from these
that no subject passed a limit and that the attackers were stopped.

- NormalGateway: end users behind a gateway, each on a network of its own: reserve, think (the
  model call), commit the actual usage, drawn from realistic sizes (log-normal prompts around
  600 tokens, answers around 250, within the granted cap).
- PromptBomb: many concurrent reserves asking the largest output, on one subject.
- CredentialStuffing: random `api_key`s from a few ips: it expects 401s, then 403 `blocked`
  (a build that answered 400 to `api_key` had no keys: the class then said so and stopped).
- MultiAccount: many fresh users behind one /24 (`attributes.ip`): per-user limits never bite,
  the `ip_prefix` limit must.
"""

from __future__ import annotations

import math
import os
import random
import secrets
import threading
import time
from typing import IO, Any

import gevent
import orjson
from locust import between, constant, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.exception import StopUser

MODELS = ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "claude-3-opus")
OUTPUT_CAPS = (256, 512, 1024, 2048)
BOMB_SUBJECT = "bomb-victim"
ABUSED_NETWORK = "203.0.113"  # TEST-NET-3: the multi-account farm's /24
STUFFING_IPS = ("198.51.100.21", "198.51.100.22", "198.51.100.23")


class AnswerLog:
    """The answers, one JSON line each; greenlets share one file, a lock keeps lines whole."""

    def __init__(self, path: str) -> None:
        self._file: IO[bytes] = open(path, "ab")  # noqa: SIM115 (closed on test_stop)
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = orjson.dumps(entry) + b"\n"
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()


@events.test_start.add_listener
def _open_log(environment: Environment, **_kwargs: Any) -> None:
    path = os.environ.get("LOADTEST_ANSWERS")
    if not path:
        raise RuntimeError("LOADTEST_ANSWERS is not set: run through loadtests/run.sh")
    environment.answer_log = AnswerLog(path)  # type: ignore[attr-defined]


@events.test_stop.add_listener
def _close_log(environment: Environment, **_kwargs: Any) -> None:
    log = getattr(environment, "answer_log", None)
    if log is not None:
        log.close()


def lognormal_int(median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(random.lognormvariate(math.log(median), sigma))))


class GatewayUser(FastHttpUser):
    """What every class shares: a reserve and a commit that log their answers."""

    abstract = True

    def answers(self) -> AnswerLog:
        log: AnswerLog = self.environment.answer_log  # type: ignore[attr-defined]
        return log

    def reserve(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST /v1/reserve; 200 and 429 are answers, not failures. Returns a grant's JSON."""
        t0 = time.time()
        with self.client.post("/v1/reserve", json=body, catch_response=True,
                              name="/v1/reserve") as response:
            t1 = time.time()
            status = response.status_code
            answer = _json(response.content)
            entry: dict[str, Any] = {
                "op": "reserve", "cls": type(self).__name__, "t0": t0, "t1": t1,
                "status": status, "user": body.get("user"), "tier": body.get("tier"),
                "ip": body.get("attributes", {}).get("ip"), "model": body.get("model")}
            if status == 200:
                reserved = answer["reserved"]
                entry.update(rid=answer["reservation_id"], input_tokens=answer["input_tokens"],
                             max_output_tokens=answer["max_output_tokens"],
                             tokens=reserved["tokens"], cost_usd=reserved["cost_usd"],
                             remaining=[lim["remaining"] for lim in answer["limits"]])
                response.success()
            elif status == 429:
                entry.update(reason=answer.get("reason"))
                response.success()
            elif 400 <= status < 500:
                entry.update(error=(answer.get("error") or {}).get("code"),
                             message=(answer.get("error") or {}).get("message"))
                response.success()  # judged by each class and by the verifier
            else:
                response.failure(f"{status}")
            self.answers().write(entry)
            return answer if status == 200 else None

    def commit(self, rid: str, input_tokens: int, output_tokens: int) -> None:
        t0 = time.time()
        body = {"reservation_id": rid, "input_tokens": input_tokens,
                "output_tokens": output_tokens}
        with self.client.post("/v1/commit", json=body, catch_response=True,
                              name="/v1/commit") as response:
            t1 = time.time()
            answer = _json(response.content)
            entry: dict[str, Any] = {"op": "commit", "cls": type(self).__name__, "t0": t0,
                                     "t1": t1, "status": response.status_code, "rid": rid}
            if response.status_code == 200:
                usage = answer["usage"]
                entry.update(tokens=usage["input_tokens"] + usage["output_tokens"],
                             input_tokens=usage["input_tokens"],
                             output_tokens=usage["output_tokens"], cost_usd=answer["cost_usd"])
                response.success()
            else:
                response.failure(f"commit answered {response.status_code}")
            self.answers().write(entry)


def _json(content: bytes | None) -> dict[str, Any]:
    try:
        loaded = orjson.loads(content or b"{}")
    except orjson.JSONDecodeError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


class NormalGateway(GatewayUser):
    """One end user each, on a network of its own, at a human pace."""

    fixed_count = 20
    wait_time = between(0.3, 1.2)

    def on_start(self) -> None:
        n = random.randrange(1_000_000)
        self.user_id = f"gw-user-{n}"
        self.ip = f"10.{n % 250}.{n // 250 % 250}.{random.randrange(1, 255)}"

    @task
    def chat(self) -> None:
        body: dict[str, Any] = {
            "user": self.user_id, "tier": "gateway", "model": random.choice(MODELS),
            "max_output_tokens": random.choice(OUTPUT_CAPS), "attributes": {"ip": self.ip}}
        if random.random() < 0.2:  # some gateways send the text and let the daemon count
            words = lognormal_int(300, 0.8, 5, 3000)
            body["messages"] = [{"role": "system", "content": "You are helpful."},
                                {"role": "user", "content": " ".join(
                                    random.choices(("budget", "token", "limit", "window",
                                                    "the", "of", "rate", "daemon"), k=words))}]
        else:
            body["input_tokens"] = lognormal_int(600, 1.0, 20, 8000)
        grant = self.reserve(body)
        if grant is None:
            return
        gevent.sleep(random.uniform(0.1, 0.8))  # the model call
        wanted = lognormal_int(250, 0.8, 10, 4000)
        self.commit(grant["reservation_id"], grant["input_tokens"],
                    min(wanted, grant["max_output_tokens"]))


class PromptBomb(GatewayUser):
    """Many concurrent reserves of the largest output on one subject; half are never
    committed (the bomber holds what it was granted until the reservations expire)."""

    fixed_count = 8
    wait_time = constant(0.05)

    @task
    def bomb(self) -> None:
        grant = self.reserve({"user": BOMB_SUBJECT, "tier": "free", "model": "claude-3-opus",
                              "input_tokens": 3_900, "max_output_tokens": 1_000_000,
                              "attributes": {"ip": "198.51.100.7"}})
        if grant is not None and random.random() < 0.5:
            gevent.sleep(0.2)
            self.commit(grant["reservation_id"], grant["input_tokens"],
                        grant["max_output_tokens"])


class CredentialStuffing(GatewayUser):
    """Random API keys from a few ips: each must fail, and the ips must end up blocked."""

    fixed_count = 3
    wait_time = constant(0.1)

    def on_start(self) -> None:
        self.ip = random.choice(STUFFING_IPS)

    @task
    def stuff(self) -> None:
        body = {"api_key": "rlk_" + secrets.token_urlsafe(24), "model": "gpt-4o",
                "input_tokens": 10, "attributes": {"ip": self.ip}}
        t0 = time.time()
        with self.client.post("/v1/reserve", json=body, catch_response=True,
                              name="/v1/reserve (api_key)") as response:
            status = response.status_code
            error = _json(response.content).get("error") or {}
            keys_unsupported = status == 400 and "api_key" in str(error.get("message", ""))
            if status >= 500 or status == 200:
                response.failure(f"{status} to a random key")
            else:
                response.success()
        if keys_unsupported:
            self.answers().write({
                "op": "skipped", "cls": "CredentialStuffing", "t0": t0,
                "why": "this build answers 400 to api_key (keys are not built yet): "
                       "credential stuffing is skipped until it does not"})
            raise StopUser()
        self.answers().write({"op": "reserve", "cls": "CredentialStuffing", "t0": t0,
                              "t1": time.time(), "status": status, "ip": self.ip,
                              "error": error.get("code")})


class MultiAccount(GatewayUser):
    """Many accounts behind one /24: fresh users each time, addresses of one network."""

    fixed_count = 6
    wait_time = constant(0.1)

    @task
    def abuse(self) -> None:
        grant = self.reserve({
            "user": f"farm-{random.randrange(100_000)}", "tier": "free", "model": "gpt-4o",
            "input_tokens": lognormal_int(200, 0.5, 20, 1000), "max_output_tokens": 300,
            "attributes": {"ip": f"{ABUSED_NETWORK}.{random.randrange(1, 255)}"}})
        if grant is not None:
            self.commit(grant["reservation_id"], grant["input_tokens"],
                        grant["max_output_tokens"] // 2)
