"""The smallest Serve application, for tests of ``kimiray serve`` itself (start-up, watchdog) that need no model."""

from __future__ import annotations

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Hello:
    async def __call__(self, request: object) -> str:
        return "hello"


app = Hello.bind()
