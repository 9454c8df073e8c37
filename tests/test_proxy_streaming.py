"""100 MB each way through edge → backhaul → worker → machine with bounded proxy memory.

The proxies (edge and worker, one process) run in a subprocess so their RSS can be
read from /proc; the machine and the client (curl) are outside it. Run as a script,
this file is that subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from test_proxy_support import (
    EDGE,
    FAST,
    VIP,
    WORKER_AMS,
    Machine,
    backend,
    free_port,
    run,
    table,
)

SIZE = 100 * 1024 * 1024
RSS_GROWTH_LIMIT = 64 * 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def _curl(script: str) -> tuple[str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_shell(script, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 40)
    return out.decode().strip(), time.monotonic() - started


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_100mb_upload_and_download_with_bounded_rss() -> None:
    async def main() -> None:
        machine = Machine("web-ams-1", "127.0.0.30", free_port("127.0.0.30"), "ams")
        await machine.start()
        port, backhaul = free_port(VIP), free_port(WORKER_AMS)
        config = {"port": port, "backhaul": backhaul, "machine": [machine.address, machine.port]}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            json.dumps(config),
            stdout=asyncio.subprocess.PIPE,
            cwd=str(Path(__file__).parent),
        )
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"ready"
            url = f"http://{VIP}:{port}"
            warm, _ = await _curl(
                f"curl -sS -o /dev/null -w '%{{http_code}}' -H 'Host: web.test' {url}/warm"
            )
            assert warm == "200"
            baseline = _status_kib(proc.pid, "VmRSS") * 1024
            down, down_s = await _curl(
                f"curl -sS -o /dev/null -w '%{{http_code}} %{{size_download}}' -H 'Host: web.test' "
                f"'{url}/download?n={SIZE}'"
            )
            assert down == f"200 {SIZE}"
            up, up_s = await _curl(
                f"head -c {SIZE} /dev/zero | curl -sS -T - -H 'Host: web.test' {url}/upload"
            )
            assert json.loads(up)["body_size"] == SIZE
            peak = _status_kib(proc.pid, "VmHWM") * 1024
            growth = peak - baseline
            print(
                f"\nproxy RSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB; "
                f"download {SIZE / down_s / 2**20:.0f} MiB/s, "
                f"upload {SIZE / up_s / 2**20:.0f} MiB/s"
            )
            assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 5)
            await machine.stop()

    run(main, timeout=80)


async def _serve(config: dict[str, object]) -> None:
    from edgeproxy.proxy import HttpProxy

    port, backhaul = int(config["port"]), int(config["backhaul"])  # type: ignore[call-overload]
    address, machine_port = config["machine"]  # type: ignore[misc]
    machine = Machine("web-ams-1", address, machine_port, "ams")
    tables = [table("web", VIP, port, [[backend(machine, "web", WORKER_AMS)]])]
    edge = HttpProxy(
        role="edge", region="ord", host_addresses=[EDGE], backhaul_port=backhaul, settings=FAST
    )
    worker = HttpProxy(
        role="worker",
        region="ams",
        host_addresses=[WORKER_AMS],
        backhaul_port=backhaul,
        settings=FAST,
    )
    for proxy in (edge, worker):
        proxy.update(tables, {"web.test": "web"})
        await proxy.start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await edge.stop()
        await worker.stop()


if __name__ == "__main__":
    from edgeproxy.proxy import new_event_loop

    loop = new_event_loop()
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(_serve(json.loads(sys.argv[1])))
