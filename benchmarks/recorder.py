"""A timestamp recorder: an EngageLab stand-in that notes when each request arrived.

Answers every ``POST /v1/user/contact`` with ``{"code": 0, "message": "success"}`` after
``--latency`` seconds, and records ``time.monotonic()`` on arrival. ``GET /_times`` returns the
arrival times (seconds, sorted) and ``GET /_stalls`` the longest delay of the recorder's own event
loop (a stall postpones the arrival times noted during it, bunching them); ``POST /_times/reset``
forgets both. Prints
``recorder listening on URL`` once it serves. The emulator keeps counts but no arrival times,
which the rate measurement needs to find the busiest one-second window.

    python benchmarks/recorder.py --port 0 --latency 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web

TICK = 0.005  # seconds between the stall watcher's wake-ups


def build_app(latency: float) -> web.Application:
    arrivals: list[float] = []
    stall = {"max_s": 0.0}

    async def watch_stalls(app: web.Application) -> AsyncIterator[None]:
        async def watch() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(TICK)
                now = time.monotonic()
                stall["max_s"] = max(stall["max_s"], now - last - TICK)
                last = now

        task = asyncio.create_task(watch())
        yield
        task.cancel()

    async def contact(request: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        await request.read()
        if latency > 0:
            await asyncio.sleep(latency)
        return web.json_response({"code": 0, "message": "success"})

    async def times(request: web.Request) -> web.Response:
        return web.json_response(sorted(arrivals))

    async def stalls(request: web.Request) -> web.Response:
        return web.json_response(stall)

    async def reset(request: web.Request) -> web.Response:
        arrivals.clear()
        stall["max_s"] = 0.0
        return web.json_response({"status": "reset"})

    app = web.Application()
    app.cleanup_ctx.append(watch_stalls)
    app.router.add_post("/v1/user/contact", contact)
    app.router.add_get("/_times", times)
    app.router.add_get("/_stalls", stalls)
    app.router.add_post("/_times/reset", reset)
    return app


async def serve(host: str, port: int, latency: float) -> None:
    runner = web.AppRunner(build_app(latency), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    print(f"recorder listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    try:
        await stopped.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.latency))


if __name__ == "__main__":
    main()
