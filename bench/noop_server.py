"""The baseline: an aiohttp + uvloop + orjson handler that reads the body and answers JSON."""

import sys

import orjson
import uvloop
from aiohttp import web


async def noop(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=orjson.dumps({"ok": True}), content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/{tail:.*}", noop)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
