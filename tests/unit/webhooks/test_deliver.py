"""The webhook worker's HTTP clients: small pools per endpoint origin, made as needed."""

from __future__ import annotations

import asyncio

import httpx

from postbode.webhooks.deliver import CONNECTIONS_PER_CLIENT, Clients


def test_pools_per_origin_grow_and_close() -> None:
    async def run() -> None:
        clients = Clients(timeout=1.0)
        a = [clients.acquire("https://a.test/hooks") for _ in range(CONNECTIONS_PER_CLIENT)]
        assert len({id(s.client) for s in a}) == 1  # one client while it has room
        extra = clients.acquire("https://a.test:443/other")  # same origin; the first is full
        assert extra.client is not a[0].client
        other = clients.acquire("http://b.test/")
        assert other.client not in {a[0].client, extra.client}
        clients.release(extra)
        assert clients.acquire("https://a.test/x") is extra  # the least busy with room
        for shard in (*a, extra, other):
            clients.release(shard)
        await clients.close_idle(0.0)
        assert a[0].client.is_closed and other.client.is_closed
        await clients.aclose()

    asyncio.run(run())


def test_a_given_client_is_used_and_never_closed() -> None:
    async def run() -> None:
        async with httpx.AsyncClient() as given:
            clients = Clients(timeout=1.0, shared=given)
            shards = [clients.acquire(f"https://h{i}.test/") for i in range(10)]
            assert {s.client for s in shards} == {given}
            for s in shards:
                clients.release(s)
            await clients.close_idle(0.0)
            await clients.aclose()
            assert not given.is_closed

    asyncio.run(run())
