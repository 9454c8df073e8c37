"""Starting the peers and servers from Debian packages (nginx, HAProxy, iperf3),
each one process tree we stop by its pid, configs written to the run's dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

from edgebench.common import BenchError, run, wait_for
from edgebench.net import BenchNet

NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
READY_TIMEOUT_S = 15.0


def listening(net: BenchNet, ns: str, address: str, port: int) -> bool:
    out = run(["ss", "-Hltn", f"src {address}:{port}"], netns=ns, check=False)
    return bool(out.strip())


def _wait_listening(net: BenchNet, p: subprocess.Popen[bytes], ns: str,
                    ports: list[tuple[str, int]], what: str, log: Path) -> None:
    def ready() -> bool:
        if p.poll() is not None:
            raise BenchError(f"{what} exited with {p.returncode}: "
                             f"{log.read_text(errors='replace')[-800:]}")
        return all(listening(net, ns, a, port) for a, port in ports)

    wait_for(what, ready, READY_TIMEOUT_S)


def nginx(net: BenchNet, ns: str, name: str, body: str,
          ports: list[tuple[str, int]], stream: bool = False) -> subprocess.Popen[bytes]:
    """nginx, 1 worker process, in foreground; ``body`` is the http/stream block."""
    prefix = net.dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    prefix.chmod(0o755)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(exist_ok=True)
    if stream and not NGINX_STREAM_MODULE.exists():
        raise BenchError(f"{NGINX_STREAM_MODULE} missing (apt install libnginx-mod-stream)")
    conf = prefix / "nginx.conf"
    conf.write_text("\n".join([
        f"load_module {NGINX_STREAM_MODULE};" if stream else "",
        "worker_processes 1;",
        "daemon off;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} warn;",
        "events { worker_connections 16384; }",
        body,
    ]) + "\n")
    log = prefix / "stdout.log"
    p = net.procs.spawn(["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"),
                         "-c", str(conf)], netns=ns, log=log)
    _wait_listening(net, p, ns, ports, f"nginx {name}", prefix / "error.log")
    return p


def haproxy(net: BenchNet, ns: str, name: str, body: str,
            ports: list[tuple[str, int]], mode: str) -> subprocess.Popen[bytes]:
    """HAProxy, one thread (nbthread 1), foreground (-db)."""
    d = net.dir / name
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "haproxy.cfg"
    conf.write_text("\n".join([
        "global",
        "  nbthread 1",
        "  maxconn 8000",
        "defaults",
        f"  mode {mode}",
        "  timeout connect 5s",
        "  timeout client 60s",
        "  timeout server 60s",
        "  timeout http-keep-alive 60s" if mode == "http" else "",
        body,
    ]) + "\n")
    log = d / "haproxy.log"
    p = net.procs.spawn(["haproxy", "-db", "-f", str(conf)], netns=ns, log=log)
    _wait_listening(net, p, ns, ports, f"haproxy {name}", log)
    return p


def iperf3_server(net: BenchNet, ns: str, address: str, port: int) -> subprocess.Popen[bytes]:
    log = net.dir / f"iperf3-{port}.log"
    p = net.procs.spawn(["iperf3", "-s", "-B", address, "-p", str(port)], netns=ns, log=log)
    _wait_listening(net, p, ns, [(address, port)], "iperf3 -s", log)
    return p
