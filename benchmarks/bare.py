"""The bare loop: the fastest plain client, to show what cdc-sync's pushing could reach.

POSTs the payloads cdc-sync would send for users ``first``..``first+rows-1``
(``{"euid": 1000+i, "contacts": {"email": "user<i>@example.com"}}``, HTTP Basic auth) to
``/v1/user/contact`` with ``concurrency`` requests in flight over one aiohttp connection pool,
then prints one JSON line: ``{"rows", "seconds", "statuses"}``. The clock runs from the first
request to the last answer; building the payloads and the session is not timed.

    python benchmarks/bare.py URL KEY SECRET --rows 4000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

import aiohttp


async def push_all(
    url: str, auth: aiohttp.BasicAuth, bodies: list[bytes], concurrency: int
) -> tuple[float, Counter[int]]:
    """Send every body, ``concurrency`` at a time; return the seconds taken and the statuses."""
    statuses: Counter[int] = Counter()
    pending = iter(bodies)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, auth=auth, headers=headers) as session:

        async def worker() -> None:
            for body in pending:
                async with session.post(url, data=body) as response:
                    await response.read()
                    statuses[response.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("api_key")
    parser.add_argument("api_secret")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--first", type=int, default=1)
    args = parser.parse_args()
    bodies = [
        json.dumps(
            {"euid": 1000 + i, "contacts": {"email": f"user{i}@example.com"}},
            separators=(",", ":"),
        ).encode()
        for i in range(args.first, args.first + args.rows)
    ]
    auth = aiohttp.BasicAuth(args.api_key, args.api_secret)
    url = args.base_url.rstrip("/") + "/v1/user/contact"
    seconds, statuses = asyncio.run(push_all(url, auth, bodies, args.concurrency))
    print(json.dumps({"rows": len(bodies), "seconds": seconds, "statuses": statuses}))


if __name__ == "__main__":
    main()
