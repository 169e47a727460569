"""Real processes for the deployment tests (tests/test_deploy.py,
tests/test_remote.py, tests/test_litestream.py): a free loopback port, a
logged subprocess, and nginx run from tmp_path with a site file from
contrib/nginx."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import need_tool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A process of this test, its output in a log file; stop() ends it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, **popen) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, **popen)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


def wait_until(proc: Proc, ready, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{proc.name}: {what} within {within} s:\n{proc.log()}")


def nginx_main_conf(prefix: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf provides around conf.d/*.conf, in tmp."""
    user = ""
    if os.geteuid() == 0:  # workers would drop to nobody and lose tmp_path
        import grp
        import pwd
        user = (f"user {pwd.getpwuid(os.getuid()).pw_name} "
                f"{grp.getgrgid(os.getgid()).gr_name};")
    temp = prefix / "temp"
    return f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    access_log {prefix}/logs/access.log;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {site};
}}
"""


def start_nginx(prefix: Path, site_text: str, port: int) -> Proc:
    """nginx with `site_text` as its only site, from `prefix` (logs/, temp/
    made here), checked with `nginx -t` first; running once it listens on
    127.0.0.1:`port`. Stop it with stop(signal.SIGQUIT)."""
    nginx_bin = need_tool("nginx")
    for sub in ("logs", "temp"):
        (prefix / sub).mkdir(exist_ok=True)
    site = prefix / "site.conf"
    site.write_text(site_text)
    main_conf = prefix / "nginx.conf"
    main_conf.write_text(nginx_main_conf(prefix, site))
    argv = [nginx_bin, "-p", str(prefix), "-c", str(main_conf), "-e", str(prefix / "logs" / "error.log")]
    checked = subprocess.run(argv + ["-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    proc = Proc("nginx", argv, prefix)

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_until(proc, listening, "not listening")
    except BaseException:
        proc.stop(signal.SIGQUIT)
        raise
    return proc
