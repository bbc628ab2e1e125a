"""CPU per ShouldRateLimit call: ratelimitd's gRPC service (one and three descriptors, one
worker, real Redis) against an empty grpc.aio handler, server CPU time (user + system, from
/proc) over N calls sent by an asyncio client with C in flight.

With grpclib importable, an empty grpclib handler too (the same messages, the same client):
grpclib is no dependency of ratelimitd, so install it somewhere of its own for the run:

    .venv/bin/python bench/grpc_bench.py [N] [C]
    .venv/bin/python -m pip install --target /tmp/grpclib-lib grpclib==0.4.9
    PYTHONPATH=/tmp/grpclib-lib .venv/bin/python bench/grpc_bench.py [N] [C]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.daemons import DaemonProcess
from tests.support.redis_servers import RedisServer, free_port

RULES = """domain: bench
descriptors:
  - key: a
    rate_limit: {unit: second, requests_per_unit: 4000000000}
  - key: b
    rate_limit: {unit: minute, requests_per_unit: 4000000000}
  - key: c
    rate_limit: {unit: hour, requests_per_unit: 4000000000}
"""
EMPTY_SERVER = textwrap.dedent("""
    import asyncio, sys, uvloop, grpc
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
    class Empty(rls_pb2_grpc.RateLimitServiceServicer):
        async def ShouldRateLimit(self, request, context):
            return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
    async def main():
        server = grpc.aio.server()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(Empty(), server)
        server.add_insecure_port(sys.argv[1])
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    uvloop.run(main())
""")

GRPCLIB_SERVER = textwrap.dedent("""
    import asyncio, sys, uvloop
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server
    from envoy.service.ratelimit.v3 import rls_pb2
    METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    class Empty:
        async def ShouldRateLimit(self, stream):
            await stream.recv_message()
            await stream.send_message(
                rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK))
        def __mapping__(self):
            return {METHOD: Handler(self.ShouldRateLimit, Cardinality.UNARY_UNARY,
                                    rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse)}
    async def main():
        host, port = sys.argv[1].rsplit(":", 1)
        server = Server([Empty()])
        await server.start(host, int(port))
        print("ready", flush=True)
        await server.wait_closed()
    uvloop.run(main())
""")


def grpclib_present() -> bool:
    try:
        import grpclib  # noqa: F401
    except ImportError:
        return False
    return True


def empty_server(code: str) -> tuple[subprocess.Popen[bytes], int]:
    """An empty handler's server process, once it listens, and its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code, f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
    return proc, port


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(n_descriptors: int, i: int) -> rls_pb2.RateLimitRequest:
    out = rls_pb2.RateLimitRequest(domain="bench")
    for key in "abc"[:n_descriptors]:
        out.descriptors.append(ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=key, value=f"u{i % 1000}")]))
    return out


async def drive(port: int, n_descriptors: int, calls: int, concurrency: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        queue = iter(range(calls))

        async def worker() -> None:
            for i in queue:
                await stub.ShouldRateLimit(request(n_descriptors, i), timeout=10)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def measure(pid: int, port: int, n_descriptors: int, calls: int, concurrency: int) -> float:
    asyncio.run(drive(port, n_descriptors, min(calls, 500), concurrency))   # warm up
    before = cpu_s(pid)
    asyncio.run(drive(port, n_descriptors, calls, concurrency))
    return (cpu_s(pid) - before) / calls * 1e6


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench.yaml").write_text(RULES)
        redis = RedisServer(work / "redis")
        port = free_port()
        daemon = DaemonProcess(work, f'url = "{redis.url}"',
                               f'[grpc]\nlisten = ["127.0.0.1:{port}"]\n'
                               '[envoy]\nconfig = ["bench.yaml"]\n')
        servers = [("grpc.aio", EMPTY_SERVER)] + (
            [("grpclib", GRPCLIB_SERVER)] if grpclib_present() else [])
        empties = [(name, *empty_server(code)) for name, code in servers]
        try:
            daemon.wait_ready()
            time.sleep(0.5)
            cpu = {name: measure(proc.pid, empty_port, 1, calls, concurrency)
                   for name, proc, empty_port in empties}
            for name in ("grpc.aio", "grpclib"):
                shown = f"{cpu[name]:7.1f} µs CPU per call" if name in cpu else (
                    "not measured (grpclib not importable)")
                print(f"empty {name + ' handler:':27}{shown}")
            for n in (1, 3):
                used = measure(daemon.proc.pid, port, n, calls, concurrency)
                print(f"ShouldRateLimit, {n} descriptor{'s' if n > 1 else ' '}:    "
                      f"{used:7.1f} µs CPU per call ({used - cpu['grpc.aio']:+.1f} over empty)")
        finally:
            for _, proc, _ in empties:
                proc.terminate()
                proc.wait(10)
            daemon.stop()
            redis.stop()


if __name__ == "__main__":
    main()
