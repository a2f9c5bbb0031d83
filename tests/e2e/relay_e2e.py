#!/usr/bin/python3
"""Relays, proxies and tampering between devices and the control plane, end to end.

Real `outpost server` and `outpost-agent` processes; network namespaces stand in for a plant
network. Namespace CP holds the control plane, namespace SITE holds the devices, and the root
namespace is the site's gateway, where a relay runs. Two veth pairs join root<->CP
(10.201.X.0/30) and root<->SITE (10.202.X.0/24); IP forwarding stays off, so SITE cannot reach
CP except through a process on the gateway. Cutting the root end of the CP link is "the relay's
upstream is down". Scenarios run in order, each printing PASS or FAIL with its reason:

  netns        The fixture itself: from SITE a TCP connect to the server fails, from root the
               server answers /healthz, SITE reaches the gateway, and cut/restore of the CP link
               works.
  tamper       TamperProxy (a Python reverse proxy on the gateway) stands in for a relay that
               went bad. A SITE device enrolls through it and converges. With flip_desired (one
               byte of each 200 answer to GET /api/v1/device/desired flipped) a new revision is
               refused: the device says the signature does not verify and keeps serving the old
               one. With flip_blob (one byte of GET /api/v1/artifacts/<digest> bodies flipped) a
               fresh version fails with a sha256 mismatch and is never activated; once the proxy
               is honest again the device installs the genuine blob.
  proxy        tinyproxy (started here, own config, free port): an agent with http_proxy and
               HTTP_PROXY converges and tinyproxy's log shows its /api/v1/device/ and
               /api/v1/artifacts/ requests; a second agent with NO_PROXY=127.0.0.1 as well
               converges without one request through it.
  proxy-upper  Only upper-case HTTP_PROXY set (libcurl alone ignores it): the agent still goes
               through tinyproxy.
  relay-converge  `outpost-agent --relay --relay-listen GW:0` on the gateway; 3 SITE devices
               enroll through it, converge and answer inferences. The server sent the model's
               bytes once (outpost_artifact_bytes_sent_total grows by exactly the file's size),
               `device list` shows via=[relay] for each, and `device show RELAY` lists the
               children and status.relay.cache.hits >= 2.
  relay-cut    Upstream cut: K inferences per device, every agent restarted from its data dir
               alone (serving from local state), K more; after restore the server counts exactly
               2K more inferences per device, and each status log has strictly increasing seqs.
  relay-enroll With the upstream cut, enrolling through the relay fails fast, saying the relay
               cannot reach the control plane; after restore the same command enrolls.
  relay-evict  On loopback: a relay with a 2K cache and four model versions evicts the blobs no
               child needs, least recently served first, and keeps the running one.
  relay-chain  On loopback: device -> relay3 -> relay2 -> relay1 -> server; the device converges
               and `device list` shows via=[relay3, relay2, relay1].
  relay-tls    On loopback: a relay with --relay-tls-cert/--relay-tls-key (a site CA made here
               with openssl) serves its children over HTTPS; a device with --ca-file converges,
               serves and trusts release metadata through it, one without is refused.
  release      On loopback, not in "all" (its own ctest, release_e2e): signed release metadata
               (`outpost release keys init`, timestamp TTL 4 s) with a TamperProxy as a lying
               mirror between device and server. Each attack makes the new revision fail with
               the reason in `outpost device show` while the old one keeps running: rollback
               (older signed timestamp+targets), freeze (one timestamp served until it expires),
               mix-and-match (current timestamp, older targets), altered (expiry edited, signature
               kept), endless data (HEAD and GET a megabyte past the signed length). After each,
               the honest mirror lets the revision install; `release keys rotate --new-root-keys`
               is followed (root 1 -> 2) and installs go on.

  delta        On loopback, not in "all" (its own ctest, delta_e2e): delta updates. A 3.2 MB
               model; each next version changes 10% of every weight tensor (a block, as a
               fine-tune of some layers would). Device D (direct), relay R and its child C hold
               v1; `model show` lists the v1->v2 delta, v2 is applied and the server sends < 20%
               of the full bytes per device (C's delta comes from R's cache). Then the v3 deltas
               are corrupted in the server's blob store: each device gives the delta up, says
               so, fetches the full blob and runs v3. A new device N (no base) gets the full
               blob, no delta offered.

  failover     On loopback: an agent started with --server P1,P2 (two TCP forwarders to one
               server) converges through P1; P1 is killed with its connections; a new revision
               still reaches the device (now through P2), its local status names P2 and counts
               the failover, its status reports and telemetry go on, and a later start with a
               different --server list replaces the kept one.

  replicas     On loopback, not in "all" (its own ctest, replicas_e2e; needs PostgreSQL's
               initdb): a private PostgreSQL cluster, two `outpost server --db postgres://...`
               replicas on one shared DATA directory, three agents spread over them (--server
               A,B or B,A) and the CLI on both. A staged rollout (waves [1, 100%], bake 4 s) is
               applied through the follower; once the first wave updated a device the leader is
               killed with SIGKILL; the other replica leads within 5 s, the rollout completes
               with no wave step taken twice, every device runs the new revision, status seqs
               stay strictly increasing and the inferences made before and after are each
               counted once.

The relay scenarios describe the relay's contract (--relay, --relay-listen, DATA/relay.addr,
"via", "children", status.relay); --scenarios netns,tamper,proxy runs the others alone.

Usage: relay_e2e.py --bin BUILD/bin [--scenarios all|relay|NAME,...] [--list] [--keep] [-v]
Exit: 0 passed, 1 a scenario failed, 77 network namespaces cannot be made (not root, no `ip`,
`ip netns add` refused), 2 usage.
"""

import argparse
import base64
import collections
import glob
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

EXIT_SKIP = 77
PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
             "no_proxy", "NO_PROXY")
INFER_BODY = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                                     "data": [0.5, -1, 2, 0.25]}]}).encode()
SIGNATURE_REFUSED = "signature does not verify"  # src/agent/sync/desired_sync.cpp
DIGEST_MISMATCH = "sha256 mismatch for"  # src/agent/fetch/fetcher.cpp
RELAY_DOWN = re.compile(r"relay.*(cannot|can't|could not|unable to|failed to) reach.*control plane",
                        re.I | re.S)
K = 5  # inferences per device per half of the upstream cut
VERBOSE = False
T0 = time.time()


class Failure(Exception):
    pass


class Blocked(Failure):
    """A scenario that cannot run because one it builds on failed (that one printed the logs)."""


class Unavailable(Exception):
    """The machine cannot host the fixture (exit 77)."""


def say(msg):
    if VERBOSE:
        print(f"    [{time.time() - T0:6.1f}s] {msg}", flush=True)


def tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def sh(*argv, check=True, timeout=30):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Failure(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def wait_until(what, fn, timeout, interval=0.25, alive=()):
    """Calls fn() until it returns something truthy and returns that. Each round checks that the
    processes in `alive` still run, so a crash fails at once rather than at the deadline."""
    deadline = time.time() + timeout
    last = None
    while True:
        for p in alive:
            p.check()
        try:
            got = fn()
            if got:
                return got
            last = got
        except (OSError, ValueError, KeyError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        if time.time() >= deadline:
            raise Failure(f"{what}: not within {timeout:.0f} s (last: {str(last)[:400]})")
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_addr(addr):
    addr = addr.strip()
    addr = addr.split("://", 1)[1] if "://" in addr else addr
    host, port = addr.rstrip("/").rsplit(":", 1)
    return host, int(port)


def prom_sum(text, name):
    """Sum of every sample of metric `name` in Prometheus text; None when there is none."""
    total = None
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            total = (total or 0.0) + float(m.group(3))
    return total


def ids_of(items):
    out = []
    for x in items or []:
        out.append(x if isinstance(x, str) else (x or {}).get("id", (x or {}).get("device_id")))
    return out


# ---- HTTP clients: one in this process (root namespace), one inside a namespace

class LocalClient:
    """HTTP and TCP from the root namespace."""

    def request(self, method, addr, path, body=None, headers=None, timeout=15):
        host, port = split_addr(addr)
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def connect(self, host, port, timeout):
        socket.create_connection((host, port), timeout=timeout).close()

    def close(self):
        pass


NS_HELPER = r"""
import base64, http.client, json, socket, sys
for line in sys.stdin:
    q = json.loads(line)
    try:
        if q["op"] == "connect":
            socket.create_connection((q["host"], q["port"]), timeout=q["timeout"]).close()
            out = {"ok": True}
        else:
            c = http.client.HTTPConnection(q["host"], q["port"], timeout=q["timeout"])
            body = base64.b64decode(q["body"]) if q.get("body") is not None else None
            c.request(q["method"], q["path"], body=body, headers=q.get("headers") or {})
            r = c.getresponse()
            data = r.read()
            c.close()
            out = {"ok": True, "status": r.status, "body": base64.b64encode(data).decode()}
    except Exception as e:
        out = {"ok": False, "error": type(e).__name__ + ": " + str(e)}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class NsClient:
    """HTTP and TCP from inside a network namespace: a small helper process there answers one
    JSON line per request (much cheaper than an `ip netns exec` per call)."""

    def __init__(self, ns):
        self.ns = ns
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-u", "-c", NS_HELPER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def _ask(self, q):
        with self.lock:
            if self.proc.poll() is not None:
                raise Failure(f"the HTTP helper in namespace {self.ns} exited "
                              f"({self.proc.returncode})")
            self.proc.stdin.write(json.dumps(q) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise Failure(f"the HTTP helper in namespace {self.ns} died")
        out = json.loads(line)
        if not out["ok"]:
            raise OSError(f"(in {self.ns}) {out['error']}")
        return out

    def request(self, method, addr, path, body=None, headers=None, timeout=15):
        host, port = split_addr(addr)
        out = self._ask({"op": "http", "method": method, "host": host, "port": port, "path": path,
                         "headers": headers or {}, "timeout": timeout,
                         "body": base64.b64encode(body).decode() if body is not None else None})
        return out["status"], base64.b64decode(out["body"])

    def connect(self, host, port, timeout):
        self._ask({"op": "connect", "host": host, "port": port, "timeout": timeout})

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the namespace fixture

class Namespaces:
    """CP and SITE namespaces joined to the root one by veth pairs; forwarding stays off.
    A context manager: whatever happens inside, the namespaces and links are deleted."""

    def __init__(self):
        pid = os.getpid()
        self.cp, self.site = f"opcp{pid}", f"opsite{pid}"
        self.cp_dev, self.cp_peer = f"opc{pid}", f"opc{pid}p"
        self.site_dev, self.site_peer = f"ops{pid}", f"ops{pid}p"
        self.made = []
        self.made_etc = []

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _pick_subnet(self):
        used = sh("ip", "-4", "-o", "addr").stdout + sh("ip", "-4", "route").stdout
        start = os.getpid() % 200 + 20
        for i in range(250):
            x = (start + i) % 250 + 1
            if f"10.201.{x}." not in used and f"10.202.{x}." not in used:
                return x
        raise Unavailable("no free 10.201.X.0/30 and 10.202.X.0/24 subnet on this machine")

    def _create(self):
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root (run as root, or skip)")
        if shutil.which("ip") is None:
            raise Unavailable("`ip` (iproute2) is not installed")
        x = self._pick_subnet()
        self.gw_cp, self.cp_addr = f"10.201.{x}.1", f"10.201.{x}.2"
        self.gw_site, self.site_addr = f"10.202.{x}.1", f"10.202.{x}.2"
        for ns in (self.cp, self.site):
            r = sh("ip", "netns", "add", ns, check=False)
            if r.returncode != 0:
                raise Unavailable(f"`ip netns add {ns}` failed: {r.stderr.strip()}")
            self.made.append(ns)
        steps = [
            ("ip", "link", "add", self.cp_dev, "type", "veth", "peer", "name", self.cp_peer),
            ("ip", "link", "set", self.cp_peer, "netns", self.cp),
            ("ip", "link", "add", self.site_dev, "type", "veth", "peer", "name", self.site_peer),
            ("ip", "link", "set", self.site_peer, "netns", self.site),
            ("ip", "addr", "add", f"{self.gw_cp}/30", "dev", self.cp_dev),
            ("ip", "addr", "add", f"{self.gw_site}/24", "dev", self.site_dev),
            ("ip", "link", "set", self.cp_dev, "up"),
            ("ip", "link", "set", self.site_dev, "up"),
            ("ip", "-n", self.cp, "addr", "add", f"{self.cp_addr}/30", "dev", self.cp_peer),
            ("ip", "-n", self.cp, "link", "set", self.cp_peer, "up"),
            ("ip", "-n", self.cp, "link", "set", "lo", "up"),
            ("ip", "-n", self.site, "addr", "add", f"{self.site_addr}/24", "dev", self.site_peer),
            ("ip", "-n", self.site, "link", "set", self.site_peer, "up"),
            ("ip", "-n", self.site, "link", "set", "lo", "up"),
            # The gateway is SITE's way out, as on a plant network; it just does not forward.
            ("ip", "-n", self.site, "route", "add", "default", "via", self.gw_site),
        ]
        for argv in steps:
            r = sh(*argv, check=False)
            if r.returncode != 0:
                raise Unavailable(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")
        # Each namespace's DNS server is its gateway, where nothing answers on port 53: a lookup
        # fails at once (ICMP port unreachable) instead of timing out towards the machine's
        # resolver, which SITE cannot reach. (ONNX Runtime looks a host name up when the agent
        # exits; with an unreachable resolver that alone costs ~10 s per stop.)
        for ns, gw in ((self.cp, self.gw_cp), (self.site, self.gw_site)):
            os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
            self.made_etc.append(f"/etc/netns/{ns}")
            with open(f"/etc/netns/{ns}/resolv.conf", "w") as f:
                f.write(f"nameserver {gw}\noptions timeout:1 attempts:1\n")
        # Off on our two interfaces whatever the machine's ip_forward says (never turned on).
        for dev in (self.cp_dev, self.site_dev):
            with open(f"/proc/sys/net/ipv4/conf/{dev}/forwarding", "w") as f:
                f.write("0")
        say(f"namespaces {self.cp} ({self.cp_addr}) and {self.site} ({self.site_addr}), "
            f"gateway {self.gw_cp}/{self.gw_site}")

    def cut(self):
        """The relay's upstream cut: the root end of the root<->CP link goes down."""
        sh("ip", "link", "set", self.cp_dev, "down")
        say(f"upstream cut ({self.cp_dev} down)")

    def restore(self):
        sh("ip", "link", "set", self.cp_dev, "up")
        say(f"upstream restored ({self.cp_dev} up)")

    def close(self):
        for ns in self.made:
            # Whatever still runs there is ours (helpers, agents the world did not stop).
            r = sh("ip", "netns", "pids", ns, check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in self.made:
            sh("ip", "netns", "del", ns, check=False)
        for d in self.made_etc:
            shutil.rmtree(d, ignore_errors=True)
        self.made_etc = []
        for dev in (self.cp_dev, self.site_dev):
            if os.path.exists(f"/sys/class/net/{dev}"):
                sh("ip", "link", "del", dev, check=False)
        self.made = []


# ---- processes

class Proc:
    def __init__(self, name, argv, log, env, ns=None):
        self.name = name
        self.log = log
        self.ns = ns
        full = (["ip", "netns", "exec", ns] if ns else []) + argv
        self.argv = full
        self.term_at = None
        self.stopped = False
        with open(log, "ab") as out:
            # Own session: a Ctrl-C at the terminal reaches us, and we stop them in order.
            self.popen = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def alive(self):
        return self.popen.poll() is None

    def check(self):
        if not self.alive():
            raise Failure(f"{self.name} exited ({self.popen.returncode}):\n{tail(self.log)}")

    def terminate(self):
        """Sends SIGTERM (once); False when the process had exited on its own before."""
        if self.term_at is None and self.alive():
            self.popen.send_signal(signal.SIGTERM)
            self.term_at = time.time()
        return self.term_at is not None

    def stop(self, timeout=30):
        """SIGTERM, as a service manager would; '' when it exited with 0, else what went wrong.
        After terminate() it only waits, so several processes can stop at once. A process that
        exited on its own is not this method's to judge (its watcher reported it)."""
        if self.stopped or not self.terminate():
            return ""
        self.stopped = True
        try:
            rc = self.popen.wait(timeout=max(1, timeout - (time.time() - self.term_at)))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return f"{self.name} did not stop within {timeout} s of SIGTERM"
        say(f"{self.name} stopped {time.time() - self.term_at:.1f} s after SIGTERM (exit {rc})")
        return "" if rc == 0 else f"{self.name} exited {rc} on SIGTERM:\n{tail(self.log, 10)}"

    def kill(self):
        if self.alive():
            self.popen.kill()
            self.popen.wait()


class World:
    """Everything the scenarios share: binaries, the temp dir, processes, fixtures."""

    def __init__(self, bin_dir, root):
        self.bin = bin_dir
        self.root = root
        self.procs = []
        self.env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV}
        self.local = LocalClient()
        self.ns = None
        self.site_client = None
        self._cp_server = None
        self._loop_server = None
        self.closers = []  # TamperProxy, tinyproxy, helpers: closed at the end
        self.touched = set()  # servers the running scenario talked to (their logs on failure)
        self.sent = collections.Counter()  # inferences answered 200, by device id
        self.relay_site = None
        self.relay_site_error = None

    def path(self, *parts):
        p = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def spawn(self, name, argv, ns=None, env=None):
        p = Proc(name, argv, self.path("logs", name.replace("/", "_") + ".log"),
                 dict(self.env, **(env or {})), ns)
        self.procs.append(p)
        say(f"started {name}" + (f" in {ns}" if ns else "") + f" (pid {p.popen.pid})")
        return p

    def binary(self, name):
        path = os.path.join(self.bin, name)
        # Another build may be replacing it right now: give it a moment to reappear.
        wait_until(f"{path} exists", lambda: os.access(path, os.X_OK), 30, 0.5)
        return path

    def cp_server(self):
        if self._cp_server is None:
            self._cp_server = Server(self, "server-cp", self.ns.cp_addr, self.ns.cp)
        return self._cp_server

    def loop_server(self):
        if self._loop_server is None:
            self._loop_server = Server(self, "server-loopback", "127.0.0.1")
            # Signed release metadata on: the loopback scenarios' devices (behind proxies and
            # relay chains, which forward and cache the documents) verify every blob with it.
            self._loop_server.cli(["release", "keys", "init", "--dir",
                                   os.path.dirname(self.path("loopback-root", "keys", "x"))])
        return self._loop_server

    def shutdown(self):
        """Stops every process still running (agents first); returns the problems."""
        problems = []
        servers = [p for p in self.procs if p.name.startswith("server-")]
        for p in self.procs:
            if p.name.startswith("tinyproxy"):
                p.kill()
        others = [p for p in self.procs if p not in servers]
        # Agents together (each may take a few seconds), then the servers they talked to.
        for group in (others, servers):
            for p in group:
                p.terminate()
            problems += [problem for problem in (p.stop(timeout=20) for p in group) if problem]
        for c in reversed(self.closers):
            try:
                c.close()
            except Exception as e:  # cleanup goes on whatever one closer does
                problems.append(f"closing {c}: {e}")
        self.closers = []
        return problems

    def kill_all(self):
        for p in self.procs:
            p.kill()


class Stopping:
    """Stops the agents in `agents` (a list that may still grow) at the end of a block, last
    started first. On a clean exit a non-zero exit code or a hang on SIGTERM fails the block; when
    the block already failed, that first failure is the one reported."""

    def __init__(self, agents):
        self.agents = agents

    def __enter__(self):
        return self.agents

    def __exit__(self, exc_type, exc, tb):
        procs = [a.proc for a in reversed(self.agents) if a.proc]
        for p in procs:
            p.terminate()
        problems = [problem for problem in (p.stop() for p in procs) if problem]
        if exc_type is None and problems:
            raise Failure("; ".join(problems))
        return False


class Server:
    """`outpost server` (in a namespace or not) and the CLI pointed at it."""

    def __init__(self, world, name, host, ns=None, extra=()):
        self.world = world
        self.name = name
        self.data = world.path(name, "data")
        self.proc = world.spawn(name, [world.binary("outpost"), "server", "--listen", f"{host}:0",
                                       "--data", self.data, "--insecure-http", *extra], ns=ns)
        pattern = re.compile(r"listening on (http://" + re.escape(host) + r":\d+)")

        def ready():
            m = pattern.search(open(self.proc.log, errors="replace").read())
            return m and os.path.exists(os.path.join(self.data, "admin.token")) and m.group(1)

        self.url = wait_until(f"{name} says where it listens", ready, 60, 0.05, [self.proc])
        self.addr = self.url.split("://", 1)[1]
        self.token = open(os.path.join(self.data, "admin.token")).read().strip()
        self.cli_env = dict(world.env, OUTPOST_SERVER=self.url, OUTPOST_TOKEN=self.token,
                            XDG_CONFIG_HOME=world.path(name, "config"))
        say(f"{name} at {self.url}")

    def cli(self, args, stdin=None, check=True):
        self.world.touched.add(self.proc)
        r = subprocess.run([self.world.binary("outpost")] + args, env=self.cli_env, input=stdin,
                           capture_output=True, text=True, timeout=60)
        if r.returncode < 0 or r.returncode >= 128 or "terminate called" in r.stderr:
            raise Failure(f"`outpost {' '.join(args)}` crashed ({r.returncode}):\n{r.stderr}")
        if check and r.returncode != 0:
            raise Failure(f"`outpost {' '.join(args)}` failed ({r.returncode}): "
                          f"{r.stderr.strip()}")
        return r

    def cli_json(self, args):
        return json.loads(self.cli(args + ["-o", "json"]).stdout)

    def enroll_token(self, site, uses):
        return self.cli_json(["token", "create", "--site", site, "--uses", str(uses),
                              "--ttl", "1h"])["token"]

    def model(self, name, version, seed):
        """Generates and pushes a tiny ONNX model; returns (path, size, digest)."""
        path = self.world.path("models", f"{name}-{version}.onnx")
        self.cli(["model", "gen", "--out", path, "--seed", str(seed)])
        self.cli(["model", "push", name, version, "--variant", path])
        blob = open(path, "rb").read()
        return path, len(blob), "sha256:" + hashlib.sha256(blob).hexdigest()

    def deploy(self, name, site, model, version):
        manifest = self.world.path("manifests", f"{name}-{model}-{version}.yaml")
        with open(manifest, "w") as f:
            f.write(f"apiVersion: outpost/v1\nkind: Deployment\nmetadata: {{name: {name}}}\n"
                    f"spec:\n  selector: {{sites: [\"{site}\"]}}\n"
                    f"  model: {{name: {model}, version: {version}}}\n"
                    f"  serve:\n    route: /models/{name}\n")
        self.cli(["apply", "-f", manifest])
        say(f"applied {name}: {model} {version} on site {site}")

    def get(self, path, auth=True):
        self.world.touched.add(self.proc)
        status, body = self.world.local.request(
            "GET", self.addr, path, headers={"Authorization": f"Bearer {self.token}"} if auth
            else {}, timeout=10)
        return status, body

    def metric(self, name):
        status, body = self.get("/metrics")
        if status != 200:
            raise Failure(f"GET /metrics on {self.name}: HTTP {status}")
        return prom_sum(body.decode(errors="replace"), name)

    def inference_count(self, device_id):
        doc = self.cli_json(["telemetry", "query", "inference_requests", "--device", device_id])
        return int(round((doc.get("aggregate") or {}).get("sum") or 0))

    def status_seqs(self, device_id):
        doc = self.cli_json(["device", "status-log", device_id, "--limit", "500"])
        return [r["seq"] for r in doc.get("reports", [])]

    def devices(self):
        doc = self.cli_json(["device", "list"])
        return {d["id"]: d for d in (doc if isinstance(doc, list) else doc.get("devices", []))}

    def device(self, device_id):
        return self.cli_json(["device", "show", device_id])


class Agent:
    """One `outpost-agent` (a device, or a relay), in a namespace or not."""

    def __init__(self, world, name, ns=None):
        self.world = world
        self.name = name
        self.ns = ns
        self.client = world.site_client if ns else world.local
        self.data = world.path(name, "data")
        self.proc = None
        self.addr = None
        self.relay_addr = None
        self.id = None

    def argv(self, server=None, token=None, relay_listen=None):
        argv = [self.world.binary("outpost-agent"), "--data", self.data, "--listen",
                "127.0.0.1:0", "--telemetry-interval", "1s", "--status-period", "2s"]
        argv += getattr(self, "extra_args", [])
        if server:
            argv += ["--server", server] + (["--enroll-token", token] if token else [])
        if relay_listen:
            argv += ["--relay", "--relay-listen", relay_listen]
        return argv

    def start(self, server=None, token=None, relay_listen=None, env=None, timeout=45):
        for f in ("agent.addr", "relay.addr"):
            if os.path.exists(os.path.join(self.data, f)):
                os.unlink(os.path.join(self.data, f))
        self.proc = self.world.spawn(self.name, self.argv(server, token, relay_listen),
                                     ns=self.ns, env=env)
        self.addr = wait_until(f"{self.name} writes agent.addr",
                               lambda: self._read("agent.addr"), timeout, 0.05, [self.proc])
        if relay_listen:
            self.relay_addr = wait_until(f"{self.name} writes relay.addr",
                                         lambda: self._read("relay.addr"), timeout, 0.05,
                                         [self.proc])
        wait_until(f"{self.name} answers /v1/status", lambda: self.status(), 20, 0.1,
                   [self.proc])
        self.id = json.load(open(os.path.join(self.data, "identity.json")))["device_id"]
        say(f"{self.name} is {self.id}, local API {self.addr}"
            + (f", relay on {self.relay_addr}" if self.relay_addr else ""))
        return self

    def _read(self, name):
        try:
            return open(os.path.join(self.data, name)).read().strip()
        except OSError:
            return None

    @property
    def relay_url(self):
        return self.relay_addr if "://" in self.relay_addr else "http://" + self.relay_addr

    def status(self):
        status, body = self.client.request("GET", self.addr, "/v1/status", timeout=10)
        if status != 200:
            raise OSError(f"GET /v1/status on {self.name}: HTTP {status}")
        return json.loads(body)

    def deployment(self, name):
        for d in self.status().get("deployments", []):
            if d.get("name") == name:
                return d
        return {}

    def wait_running(self, name, revision=None, timeout=45):
        def running():
            d = self.deployment(name)
            if d.get("phase") == "running" and (revision is None or
                                                d.get("current_revision") == revision):
                return d
            return None
        try:
            return wait_until(f"{self.name}: deployment {name} running"
                              + (f" revision {revision}" if revision else ""), running, timeout,
                              0.25, [self.proc])
        except Failure as e:
            raise Failure(f"{e}\n{self.name} says: {json.dumps(self.deployment_or_status(name))}")

    def deployment_or_status(self, name):
        try:
            s = self.status()
        except OSError as e:
            return str(e)
        return {"deployment": self.deployment(name), "online": s.get("online"),
                "link_error": s.get("link_error")}

    def infer(self, name):
        """One inference; returns the answer. Counted in world.sent when it succeeded."""
        status, body = self.client.request("POST", self.addr, f"/models/{name}/infer",
                                           INFER_BODY, {"Content-Type": "application/json"})
        if status != 200:
            raise Failure(f"{self.name}: POST /models/{name}/infer: HTTP {status} "
                          f"{body[:300]!r}")
        self.world.sent[self.id] += 1
        return json.loads(body)

    def stop(self):
        problem = self.proc.stop() if self.proc else ""
        if problem:
            raise Failure(problem)


# ---- the tampering relay double

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
              "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
              "expect", "content-length"}


class TamperProxy:
    """A threaded HTTP/1.1 reverse proxy standing in for a relay: every request (method,
    path+query, headers including Authorization, body) goes to the server and the answer comes
    back. flip_desired flips one byte of 200 answers to GET /api/v1/device/desired; flip_blob
    one byte of GET /api/v1/artifacts/<digest> bodies."""

    def __init__(self, listen_host, upstream_url, log_path, name="tamper proxy"):
        self.name = name
        self.flip_desired = False
        self.flip_blob = False
        # rewrite(method, path, status, data) -> (status, data, head_length or None) or None:
        # a relay or mirror that lies (the release scenario's attacks).
        self.rewrite = None
        self.counts = collections.Counter()
        self.upstream = split_addr(upstream_url)
        self.log = open(log_path, "a", buffering=1)
        self.log_lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                proxy.note(fmt % args)

            def _body(self):
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def forward(self):
                body = self._body()
                proxy.counts["requests"] += 1
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True,
                                    skip_accept_encoding=True)
                    conn.putheader("Host", f"{proxy.upstream[0]}:{proxy.upstream[1]}")
                    for k, v in self.headers.items():
                        if k.lower() not in HOP_BY_HOP:
                            conn.putheader(k, v)
                    if body or self.command in ("POST", "PUT", "PATCH"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body if body else None)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    msg = json.dumps({"error": {
                        "message": f"{proxy.name} cannot reach the control plane at "
                                   f"{proxy.upstream[0]}:{proxy.upstream[1]}: {e}"}})
                    self.send_response_only(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg.encode())
                    return
                finally:
                    conn.close()
                path = self.path.split("?", 1)[0]
                if data and self.command == "GET":
                    if (proxy.flip_desired and resp.status == 200
                            and path == "/api/v1/device/desired"):
                        data = flip(data)
                        proxy.counts["flipped_desired"] += 1
                    if (proxy.flip_blob and resp.status in (200, 206)
                            and path.startswith("/api/v1/artifacts/")):
                        data = flip(data)
                        proxy.counts["flipped_blob"] += 1
                status, reason, head_length = resp.status, resp.reason, None
                rewrite = proxy.rewrite
                if rewrite:
                    changed = rewrite(self.command, path, status, data)
                    if changed:
                        status, data, head_length = changed
                        reason = None
                        proxy.counts["rewritten"] += 1
                self.send_response_only(status, reason)
                length = str(len(data))
                for k, v in resp.getheaders():
                    if k.lower() in HOP_BY_HOP:
                        if k.lower() == "content-length" and self.command == "HEAD":
                            length = v  # a HEAD answer says the size of the GET's body
                        continue
                    self.send_header(k, v)
                if head_length is not None:
                    length = str(head_length)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request, client_address):
                # A device that hung up mid-answer (stopped during a long-poll): logged only.
                proxy.note(f"{client_address}: {sys.exc_info()[1]!r}")

        self.httpd = Server((listen_host, 0), Handler)
        self.addr = f"{listen_host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def note(self, text):
        with self.log_lock:  # a held long-poll may answer after close(): dropped then
            if not self.log.closed:
                self.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.log_lock:
            self.log.close()

    def __str__(self):
        return f"TamperProxy {self.addr}"


def flip(data):
    b = bytearray(data)
    b[len(b) // 2] ^= 0x01
    return bytes(b)


# ---- tinyproxy

class Tinyproxy:
    """tinyproxy on a free loopback port with its own config and log in the temp dir (never the
    system service)."""

    def __init__(self, world):
        if shutil.which("tinyproxy") is None:
            raise Failure("tinyproxy is not installed (scripts/install-deps installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = world.path("tinyproxy", "tinyproxy.log")
        conf = world.path("tinyproxy", "tinyproxy.conf")
        with open(conf, "w") as f:
            # Timeout above the agent's 55 s long-poll, so a held poll is not cut by the proxy.
            f.write(f"Port {self.port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 600\n"
                    f"LogFile \"{self.log}\"\nLogLevel Info\nMaxClients 100\n")
        self.proc = world.spawn("tinyproxy", ["tinyproxy", "-d", "-c", conf])
        wait_until("tinyproxy accepts connections",
                   lambda: world.local.connect("127.0.0.1", self.port, 1) or True, 15, 0.1,
                   [self.proc])

    def requests(self):
        """The request URLs tinyproxy logged so far, in order."""
        try:
            text = open(self.log, errors="replace").read()
        except OSError:
            return []
        return re.findall(r"Request \(file descriptor \d+\): \S+ (\S+)", text)


# ---- scenarios

def scenario_netns(w):
    ns = w.ns
    server = w.cp_server()
    host, port = split_addr(server.url)
    status, _ = server.get("/healthz", auth=False)
    if status != 200:
        raise Failure(f"from root, {server.url}/healthz answered HTTP {status}")
    t = time.time()
    try:
        w.site_client.connect(host, port, 3)
    except OSError as e:
        blocked = f"{e} after {time.time() - t:.1f} s"
    else:
        raise Failure(f"from {ns.site}, a TCP connect to the server {host}:{port} succeeded: "
                      f"the gateway forwards, so the relay tests would prove nothing")
    with socket.socket() as listener:  # SITE itself works: it reaches the gateway
        listener.bind((ns.gw_site, 0))
        listener.listen(1)
        w.site_client.connect(ns.gw_site, listener.getsockname()[1], 3)
    ns.cut()
    try:
        try:
            server.get("/healthz", auth=False)
            raise Failure("with the CP link cut, root still reaches the server")
        except OSError:
            pass
    finally:
        ns.restore()
    wait_until("the server answers again after restore",
               lambda: server.get("/healthz", auth=False)[0] == 200, 10)
    return (f"{ns.site} -> {host}:{port} fails ({blocked}); root -> /healthz 200; "
            f"{ns.site} -> gateway {ns.gw_site} ok; cut/restore ok")


def scenario_tamper(w):
    server = w.cp_server()
    proxy = TamperProxy(w.ns.gw_site, server.url, w.path("logs", "tamper-proxy.log"))
    w.closers.append(proxy)
    token = server.enroll_token("tamper", 1)
    server.model("tm", "1.0.0", 11)
    server.deploy("tamper", "tamper", "tm", "1.0.0")
    dev = Agent(w, "tamper-dev", ns=w.ns.site).start(f"http://{proxy.addr}", token)
    try:
        with Stopping([dev]):
            dev.wait_running("tamper", 1)
            if dev.infer("tamper").get("model_version") != "1.0.0":
                raise Failure("revision 1 does not answer with model version 1.0.0")
            gen1 = dev.status()["generation"]
            say(f"converged through the proxy at generation {gen1}")

            # 1. A tampered desired state: refused, the old revision keeps serving.
            proxy.flip_desired = True
            server.model("tm", "2.0.0", 12)
            server.deploy("tamper", "tamper", "tm", "2.0.0")
            s = wait_until("the device reports the tampered desired state",
                           lambda: (lambda s: SIGNATURE_REFUSED in s.get("link_error", "") and s)(
                               dev.status()), 30, 0.2, [dev.proc])
            refused = s["link_error"]
            if s["generation"] != gen1:
                raise Failure(f"the device moved to generation {s['generation']} from a tampered "
                              f"desired state")
            on_disk = json.load(open(os.path.join(dev.data, "desired.json")))["generation"]
            if on_disk != gen1:
                raise Failure(f"desired.json holds generation {on_disk}, not the verified {gen1}")
            d = dev.deployment("tamper")
            answer = dev.infer("tamper")
            if d.get("revision") != 1 or d.get("phase") != "running" or \
                    answer.get("model_version") != "1.0.0":
                raise Failure(f"the old revision stopped serving: {json.dumps(d)}, answer {answer}")
            if proxy.counts["flipped_desired"] < 1:
                raise Failure("the proxy flipped no desired state")
            say(f"refused: {refused!r}")

            # 2. A tampered blob: the download fails verification; never activated.
            proxy.flip_desired = False
            proxy.flip_blob = True
            _, _, digest3 = server.model("tm", "3.0.0", 13)
            server.deploy("tamper", "tamper", "tm", "3.0.0")

            def mismatch():
                # Generation 2 (version 2.0.0, tampered too) may come first: wait for 3.0.0's.
                d = dev.deployment("tamper")
                msg = d.get("message", "")
                return DIGEST_MISMATCH in msg and digest3 in msg and d

            d = wait_until(f"the device reports the tampered blob {digest3}", mismatch, 45, 0.2,
                           [dev.proc])
            if d.get("current_revision") != 1:
                raise Failure(f"current revision is {d.get('current_revision')}, not 1: "
                              f"{json.dumps(d)}")
            answer = dev.infer("tamper")
            if answer.get("model_version") != "1.0.0":
                raise Failure(f"with the tampered blob, the device answers with {answer}")
            store = os.path.join(dev.data, "artifacts", "sha256")
            for name in os.listdir(store):
                actual = hashlib.sha256(open(os.path.join(store, name), "rb").read()).hexdigest()
                if actual != name:
                    raise Failure(f"artifact store holds {name} hashing to {actual}")
            if os.path.exists(os.path.join(store, digest3[7:])):
                raise Failure("the tampered download reached the artifact store")
            if proxy.counts["flipped_blob"] < 1:
                raise Failure("the proxy flipped no blob")
            mismatch_msg = d["message"]
            say(f"blob refused: {mismatch_msg!r}")

            # 3. An honest proxy again: the genuine blob is installed.
            proxy.flip_blob = False
            dev.wait_running("tamper", 3, timeout=60)
            answer = dev.infer("tamper")
            if answer.get("model_version") != "3.0.0":
                raise Failure(f"after the honest download, revision 3 answers {answer}")
            return (f"converged via proxy; tampered desired refused ({refused[:90]!r}), rev 1 "
                    f"kept serving; tampered blob refused ({mismatch_msg[:70]!r}...), never "
                    f"activated; genuine blob then installed (rev 3 serves 3.0.0); flipped "
                    f"{proxy.counts['flipped_desired']} desired, "
                    f"{proxy.counts['flipped_blob']} blob")
    finally:
        proxy.close()
        w.closers.remove(proxy)


def proxy_common(w, site, deployment, seed):
    server = w.loop_server()
    tiny = Tinyproxy(w)
    server.model(f"{site}-m", "1.0.0", seed)
    server.deploy(deployment, site, f"{site}-m", "1.0.0")
    return server, tiny


def scenario_proxy(w):
    server, tiny = proxy_common(w, "proxied", "proxied", 31)
    agents = []
    try:
        with Stopping(agents):
            token = server.enroll_token("proxied", 2)
            env = {"http_proxy": tiny.url, "HTTP_PROXY": tiny.url}
            a1 = Agent(w, "proxy-dev1")
            agents.append(a1)
            a1.start(server.url, token, env=env)
            a1.wait_running("proxied", 1)
            a1.infer("proxied")
            wait_until("the agent's telemetry and status go out",
                       lambda: (lambda s: s["telemetry"]["batches_sent"] >= 1
                                and s["status_queued"] == 0)(a1.status()), 15, 0.2, [a1.proc])
            seen = [u for u in tiny.requests() if server.addr in u]
            device_paths = [u for u in seen if "/api/v1/device/" in u]
            artifact_paths = [u for u in seen if "/api/v1/artifacts/" in u]
            if not device_paths:
                raise Failure(f"tinyproxy logged no /api/v1/device/ request (logged: {seen[:5]})")
            if not artifact_paths:
                raise Failure("the artifact download did not go through tinyproxy "
                              f"(logged: {sorted(set(u.split('?')[0] for u in seen))})")
            a1.stop()
            before = len(tiny.requests())
            a2 = Agent(w, "proxy-dev2")
            agents.append(a2)
            a2.start(server.url, token, env=dict(env, NO_PROXY="127.0.0.1"))
            a2.wait_running("proxied", 1)
            a2.infer("proxied")
            wait_until("the second agent's telemetry and status go out",
                       lambda: (lambda s: s["telemetry"]["batches_sent"] >= 2
                                and s["status_queued"] == 0)(a2.status()), 15, 0.2, [a2.proc])
            new = tiny.requests()[before:]
            a2.stop()
            if new:
                raise Failure(f"with NO_PROXY=127.0.0.1, {len(new)} request(s) still went through "
                              f"tinyproxy: {new[:3]}")
            kinds = sorted(set(re.sub(r"\?.*|/sha256:.*", "", u.split(server.addr, 1)[1])
                               for u in seen))
            return (f"via tinyproxy: {len(device_paths)} device + {len(artifact_paths)} artifact "
                    f"request(s) ({', '.join(kinds)}); with NO_PROXY: converged, 0 through "
                    f"the proxy")
    finally:
        tiny.proc.kill()


def scenario_proxy_upper(w):
    server, tiny = proxy_common(w, "upper", "upper", 32)
    agents = []
    try:
        with Stopping(agents):
            token = server.enroll_token("upper", 1)
            a = Agent(w, "proxy-upper-dev")
            agents.append(a)
            a.start(server.url, token, env={"HTTP_PROXY": tiny.url})
            a.wait_running("upper", 1)
            wait_until("the agent's status goes out",
                       lambda: a.status()["status_queued"] == 0, 15, 0.2, [a.proc])
            seen = [u for u in tiny.requests() if server.addr in u]
            a.stop()
            kinds = sorted(set(re.sub(r"\?.*|/sha256:.*", "", u.split(server.addr, 1)[1])
                               for u in seen))
            missing = [p for p in ("/api/v1/device/enroll", "/api/v1/device/desired",
                                   "/api/v1/device/status", "/api/v1/artifacts") if p not in kinds]
            if missing:
                raise Failure(f"with only HTTP_PROXY set, tinyproxy never saw {missing} "
                              f"(saw {kinds})")
            return (f"with only HTTP_PROXY: {len(seen)} request(s) via tinyproxy "
                    f"({', '.join(kinds)})")
    finally:
        tiny.proc.kill()


class RelaySite:
    """The relay on the gateway and its 3 SITE devices, shared by the relay-* scenarios."""

    def __init__(self, w):
        server = w.cp_server()
        self.server = server
        self.token = server.enroll_token("edge", 10)
        self.bytes_before = server.metric("outpost_artifact_bytes_sent_total")
        _, self.size, self.digest = server.model("edge-m", "1.0.0", 21)
        server.deploy("edge", "edge", "edge-m", "1.0.0")
        self.relay = Agent(w, "relay").start(server.url, self.token,
                                             relay_listen=f"{w.ns.gw_site}:0")
        self.devices = [Agent(w, f"edge-dev{i}", ns=w.ns.site).start(self.relay.relay_url,
                                                                    self.token)
                        for i in range(1, 4)]


def relay_site(w):
    if w.relay_site is None and w.relay_site_error is None:
        try:
            w.relay_site = RelaySite(w)
        except Failure as e:
            w.relay_site_error = str(e)
            raise
    if w.relay_site is None:
        first = " ".join(w.relay_site_error.split())[:200]
        raise Blocked(f"needs the relay site, which did not start: {first}")
    return w.relay_site


def scenario_relay_converge(w):
    site = relay_site(w)
    server = site.server
    for a in [site.relay] + site.devices:
        a.wait_running("edge", 1)
    for d in site.devices:
        d.infer("edge")
    if site.bytes_before is None:
        site.bytes_before = 0.0

    def bytes_sent():
        v = server.metric("outpost_artifact_bytes_sent_total")
        if v is None:
            raise Failure("the server's /metrics has no outpost_artifact_bytes_sent_total")
        return v - site.bytes_before

    # Every check runs and all failures are told together: which half of the contract broke.
    problems = []
    try:
        wait_until(f"the server sent {site.size} bytes", lambda: bytes_sent() >= site.size, 10)
    except Failure as e:
        problems.append(str(e))
    time.sleep(1)  # and no more follow
    sent = bytes_sent()
    if sent != site.size:
        problems.append(f"the server sent {sent:.0f} artifact bytes for a {site.size}-byte model "
                        f"(one download for the site expected; {sent / site.size:.1f} downloads; "
                        f"the relay is a device of the site too)")
    rid = site.relay.id
    ids = [d.id for d in site.devices]
    seen = {}

    def topology():
        listed = server.devices()
        seen["via"] = {i: listed.get(i, {}).get("via") for i in ids}
        shown = server.device(rid)
        seen["children"] = sorted(ids_of(shown.get("children")))
        relay = (shown.get("status") or {}).get("relay") or {}
        seen["cache.hits"] = (relay.get("cache") or {}).get("hits")
        hits = seen["cache.hits"]
        return (all(v == [rid] for v in seen["via"].values()) and seen["children"] == sorted(ids)
                and isinstance(hits, (int, float)) and hits >= 2)

    try:
        wait_until("the server shows the relay topology", topology, 15, 0.5)
    except Failure as e:
        problems.append(f"{e}; the server shows {seen} (relay {rid}, devices {ids})")
    if problems:
        raise Failure("; ".join(problems))
    return (f"3 devices via relay {rid} running; server sent {sent:.0f} bytes (= model size); "
            f"via=[{rid}] for each; children={seen['children']}; "
            f"cache.hits={seen['cache.hits']}")


def scenario_relay_cut(w):
    site = relay_site(w)
    server = site.server
    devs = site.devices
    for d in devs:
        d.wait_running("edge")
    # Settled first: what was answered so far is on the server, no more, no less.
    for d in devs:
        wait_until(f"{d.name}'s inferences so far reach the server",
                   lambda d=d: server.inference_count(d.id) == w.sent[d.id], 30, 0.5)
    before = {d.id: server.inference_count(d.id) for d in devs}
    seq_before = {d.id: max(server.status_seqs(d.id) or [0]) for d in devs}
    say(f"before the cut: inferences {before}, status seqs up to {seq_before}")
    w.ns.cut()
    try:
        try:
            server.get("/healthz", auth=False)
            raise Failure("the upstream cut did not cut the server off")
        except OSError:
            pass
        for d in devs:
            for _ in range(K):
                d.infer("edge")
        for d in devs:
            d.proc.terminate()
        for d in devs:
            d.stop()
        for d in devs:
            d.start()  # --data alone: enrolled, serving from its saved desired state
        for d in devs:
            d.wait_running("edge", timeout=30)
            for _ in range(K):
                d.infer("edge")
        time.sleep(5)  # the relay and devices hold what they queued meanwhile
    finally:
        w.ns.restore()
    want = {i: before[i] + 2 * K for i in before}

    def delivered():
        got = {d.id: server.inference_count(d.id) for d in devs}
        over = {i: n for i, n in got.items() if n > want[i]}
        if over:
            raise Failure(f"the server counts more inferences than were made: {got}, "
                          f"expected {want}")
        queued = [d.name for d in devs if d.status().get("status_queued")]
        return got == want and not queued and got

    wait_until(f"the server counts exactly {2 * K} more inferences per device", delivered, 60,
               0.5)
    time.sleep(3)  # and no duplicates show up later
    got = {d.id: server.inference_count(d.id) for d in devs}
    if got != want:
        raise Failure(f"after settling the server counts {got}, expected {want}")
    for d in devs:
        seqs = server.status_seqs(d.id)
        if any(b <= a for a, b in zip(seqs, seqs[1:])):
            raise Failure(f"{d.name}'s status log is not strictly increasing: {seqs}")
        if not seqs or seqs[-1] <= seq_before[d.id]:
            raise Failure(f"{d.name}: no status report after the cut reached the server "
                          f"(seqs {seqs[-5:]}, before {seq_before[d.id]})")
    return (f"through a cut with restarts: server counts before+{2 * K} per device exactly "
            f"({got}); status logs strictly increasing")


def scenario_relay_enroll(w):
    site = relay_site(w)
    late = Agent(w, "edge-late", ns=w.ns.site)
    w.ns.cut()
    try:
        t = time.time()
        p = w.spawn("edge-late-enroll", late.argv(site.relay.relay_url, site.token),
                    ns=w.ns.site)
        try:
            rc = p.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise Failure("enrolling through the relay with its upstream down hung for 30 s")
        took = time.time() - t
        out = open(p.log, errors="replace").read()
        if rc == 0:
            raise Failure(f"enrollment with the upstream down exited 0:\n{out[-800:]}")
        if took > 20:
            raise Failure(f"enrollment with the upstream down took {took:.0f} s to fail")
        if not RELAY_DOWN.search(out):
            raise Failure(f"the error does not say the relay cannot reach the control plane:\n"
                          f"{out[-800:]}")
        reason = out.strip().splitlines()[-1] if out.strip() else ""
    finally:
        w.ns.restore()
    with Stopping([late]):
        late.start(site.relay.relay_url, site.token, timeout=60)
        late.wait_running("edge", 1)
        late.infer("edge")
    return (f"refused in {took:.1f} s, exit {rc}: {reason[:240]!r}; after restore it enrolled "
            f"({late.id}) and serves")


def scenario_relay_chain(w):
    server = w.loop_server()
    token = server.enroll_token("chain", 4)
    server.model("chain-m", "1.0.0", 41)
    server.deploy("chain", "chain", "chain-m", "1.0.0")
    agents = []
    with Stopping(agents):
        upstream = server.url
        for i in (1, 2, 3):
            r = Agent(w, f"chain-relay{i}")
            agents.append(r)
            upstream = r.start(upstream, token, relay_listen="127.0.0.1:0").relay_url
        dev = Agent(w, "chain-dev")
        agents.append(dev)
        dev.start(upstream, token)
        dev.wait_running("chain", 1)
        dev.infer("chain")
        trust = dev.status().get("release", {})
        if trust.get("state") != "trusted" or not trust.get("targets"):
            raise Failure(f"through 3 relays the device does not trust release metadata: {trust}")
        relays = agents[:3]
        want = [relays[2].id, relays[1].id, relays[0].id]
        seen = {}

        def chain():
            seen["via"] = server.devices().get(dev.id, {}).get("via")
            return seen["via"] == want and seen["via"]

        try:
            via = wait_until("the server shows the chain", chain, 15, 0.5)
        except Failure as e:
            raise Failure(f"{e}; device list shows via={seen.get('via')}, expected {want} "
                          f"(relay3, relay2, relay1)")
        return (f"device {dev.id} converged through 3 relays, verifying signed release metadata "
                f"(targets version {trust['targets'].get('version')}) they forwarded; via={via}")


DELTA_PY = r"""
import sys, numpy as np, onnx
from onnx import numpy_helper
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = onnx.load(src)
rng = np.random.default_rng(seed)
changed = total = 0
for init in m.graph.initializer:
    a = numpy_helper.to_array(init).copy()
    flat = a.reshape(-1)
    total += flat.size
    n = flat.size // 10
    if n == 0:
        continue
    start = int(rng.integers(0, flat.size - n + 1))
    flat[start:start + n] += rng.normal(0, 0.01, n).astype(flat.dtype)
    changed += n
    init.CopyFrom(numpy_helper.from_array(a, init.name))
onnx.save(m, dst)
print(f"{changed} of {total} weights changed")
"""


def scenario_delta(w):
    """Delta updates: < 20 % of the bytes per device, fallback on a bad delta, full for new."""
    s = Server(w, "server-delta", "127.0.0.1")
    s.cli(["release", "keys", "init", "--dir",
           os.path.dirname(w.path("delta-root", "keys", "x"))])
    site = "delta"
    v1 = w.path("models", "dm-1.0.0.onnx")
    s.cli(["model", "gen", "--out", v1, "--hidden", "100000", "--seed", "61"])
    versions = [v1]
    for n in (2, 3):
        out = w.path("models", f"dm-{n}.0.0.onnx")
        r = subprocess.run([sys.executable, "-c", DELTA_PY, versions[-1], out, str(n)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise Failure(f"perturbing the model with python3-onnx failed: {r.stderr[-800:]}")
        versions.append(out)
    digests = ["sha256:" + hashlib.sha256(open(p, "rb").read()).hexdigest() for p in versions]
    sizes = [os.path.getsize(p) for p in versions]

    def push(n):
        s.cli(["model", "push", "dm", f"{n}.0.0", "--variant", versions[n - 1]])

    def ready_deltas(n, want):
        """Waits for `want` ready deltas to version n; returns them ({base: row})."""
        def find():
            doc = s.cli_json(["model", "show", "dm"])
            for v in doc.get("versions", []):
                if v.get("version") == f"{n}.0.0":
                    rows = [d for var in v.get("variants", []) for d in var.get("deltas", [])]
                    ready = {d["base"]: d for d in rows if d.get("state") == "ready"}
                    if len(ready) >= want:
                        return ready
                    skipped = [d for d in rows if d.get("state") == "skipped"]
                    if skipped:
                        raise Failure(f"the server skipped a delta to {n}.0.0: {skipped}")
            return None
        return wait_until(f"`model show dm` lists {want} ready delta(s) to {n}.0.0", find, 120,
                          0.5, [s.proc])

    def logged(agent, needle):
        return needle in open(agent.proc.log, errors="replace").read()

    push(1)
    s.deploy("dl", site, "dm", "1.0.0")
    token = s.enroll_token(site, 4)
    d, r, c = Agent(w, "delta-direct"), Agent(w, "delta-relay"), Agent(w, "delta-child")
    agents = [d, r, c]
    notes = []
    with Stopping(agents):
        d.start(s.url, token)
        r.start(s.url, token, relay_listen="127.0.0.1:0")
        c.start(r.relay_url, token)
        for a in agents:
            a.wait_running("dl", 1, timeout=90)

        # v2: every device holds v1, so each is offered the delta.
        push(2)
        delta2 = ready_deltas(2, 1)[digests[0]]
        before = s.metric("outpost_artifact_bytes_sent_total")
        s.deploy("dl", site, "dm", "2.0.0")
        for a in agents:
            a.wait_running("dl", 2, timeout=90)
        sent = s.metric("outpost_artifact_bytes_sent_total") - before
        per_device = sent / len(agents) / sizes[1]
        for a in agents:
            if not logged(a, "rebuilt from delta " + delta2["delta"]):
                raise Failure(f"{a.name} did not rebuild {digests[1]} from the delta")
        if sent > 2 * delta2["size"]:
            raise Failure(f"the server sent {sent} bytes for the v2 update, more than the delta "
                          f"({delta2['size']} B) to D and to R: C's should come from R's cache")
        if per_device >= 0.20:
            raise Failure(f"the v2 update moved {sent} bytes for {len(agents)} devices, "
                          f"{per_device:.1%} of the full {sizes[1]} bytes per device (>= 20%)")
        notes.append(f"v1->v2: delta {delta2['size']} B of {sizes[1]} B; server sent "
                     f"{sent} B for 3 devices = {per_device:.1%} of full per device")

        # v3 with its deltas damaged on the server: each device falls back to the full blob.
        push(3)
        deltas3 = ready_deltas(3, 2)
        for row in deltas3.values():
            blob = os.path.join(s.data, "blobs", "sha256", row["delta"].split(":", 1)[1])
            data = bytearray(open(blob, "rb").read())
            for i in range(64, len(data), max(1, len(data) // 32)):
                data[i] ^= 0x5A
            with open(blob, "wb") as f:
                f.write(bytes(data))
        t3 = time.time()
        s.deploy("dl", site, "dm", "3.0.0")
        for a in agents:
            a.wait_running("dl", 3, timeout=120)
            if not logged(a, "given up"):
                raise Failure(f"{a.name} runs v3 but never said it gave the bad delta up")
            if logged(a, "rebuilt from delta " + deltas3[digests[1]]["delta"]):
                raise Failure(f"{a.name} says it rebuilt v3 from a corrupted delta")
        for a in agents:
            a.infer("dl")
        notes.append(f"corrupted v3 deltas: all 3 devices gave them up, fetched the full blob "
                     f"and serve v3 {time.time() - t3:.1f} s after the apply")

        # A new device holds no base: the full blob, no delta offered. It joins once the
        # rollout is over (one that joins mid-rollout is given the older revision first).
        wait_until("rollout of revision 3 completed",
                   lambda: s.cli_json(["rollout", "status", "dl"]).get("state") == "completed"
                   and s.cli_json(["rollout", "status", "dl"]).get("to_revision") == 3, 60, 0.5,
                   [s.proc])
        n = Agent(w, "delta-new")
        agents.append(n)
        before = s.metric("outpost_artifact_bytes_sent_total")
        n.start(s.url, token)
        n.wait_running("dl", 3, timeout=90)
        sent = s.metric("outpost_artifact_bytes_sent_total") - before
        offered = "deltas" in open(os.path.join(n.data, "desired.json")).read()
        if sent < sizes[2] or logged(n, "rebuilt from delta") or offered:
            raise Failure(f"the new device got {sent} bytes for a {sizes[2]} B model (log "
                          f"mentions a delta: {logged(n, 'rebuilt from delta')}, its desired "
                          f"state offers one: {offered})")
        notes.append(f"new device: full blob ({sent} B)")
    line = next((ln.strip() for ln in s.cli(["model", "show", "dm"]).stdout.splitlines()
                 if "delta from " + digests[0] in ln), None)
    if line is None:
        raise Failure("`outpost model show dm` has no 'delta from <v1>' line")
    notes.append(f"model show: {line}")
    return "; ".join(notes)


class TcpForwarder:
    """A TCP port that forwards every connection to `upstream` ("host:port"); close() drops the
    listener and every connection at once, as a replica that dies would."""

    def __init__(self, upstream, name="forwarder"):
        self.upstream = split_addr(upstream)
        self.name = name
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.addr = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.url = "http://" + self.addr
        self.socks = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed:
                    client.close()
                    server.close()
                    return
                self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        with self.lock:
            self.closed = True
            socks, self.socks = self.socks, []
        try:
            self.listener.close()
        except OSError:
            pass
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def __str__(self):
        return f"{self.name} on {self.addr}"


def scenario_failover(w):
    """--server P1,P2: the agent moves to P2 when P1 dies and keeps converging."""
    s = w.loop_server()
    p1 = TcpForwarder(s.addr, "replica 1")
    p2 = TcpForwarder(s.addr, "replica 2")
    w.closers += [p1, p2]
    s.model("fo-m", "1.0.0", 71)
    s.model("fo-m", "2.0.0", 72)
    s.deploy("fo", "failover", "fo-m", "1.0.0")
    a = Agent(w, "failover-agent")
    with Stopping([a]):
        a.start(f"{p1.url},{p2.url}", s.enroll_token("failover", 1))
        a.wait_running("fo", 1)
        st = a.status()
        if st.get("server") != f"{p1.url},{p2.url}" or st.get("server_in_use") != p1.url:
            raise Failure(f"before the failure the agent should use {p1.url} of both: "
                          f"server={st.get('server')} in use={st.get('server_in_use')}")
        seqs_before = len(s.status_seqs(a.id))
        p1.close()
        t = time.time()
        s.deploy("fo", "failover", "fo-m", "2.0.0")
        a.wait_running("fo", 2, timeout=60)
        took = time.time() - t
        st = a.status()
        if st.get("server_in_use") != p2.url or st.get("server_failovers", 0) < 1:
            raise Failure(f"after {p1} died the agent says it uses {st.get('server_in_use')} "
                          f"with {st.get('server_failovers')} failover(s)")
        a.infer("fo")
        wait_until("status reports through replica 2 reach the server",
                   lambda: len(s.status_seqs(a.id)) > seqs_before + 1, 30, 0.5, [a.proc])
        wait_until("the inference is counted through replica 2",
                   lambda: s.inference_count(a.id) >= 1, 30, 0.5, [a.proc])
        seqs = s.status_seqs(a.id)
        if seqs != sorted(set(seqs)):
            raise Failure(f"status seqs repeat or go back across the failover: {seqs}")
        a.stop()
        a.start(p2.url, None)
        doc = json.load(open(os.path.join(a.data, "identity.json")))
        if doc.get("server") != p2.url:
            raise Failure(f"a start with --server {p2.url} left identity.json at "
                          f"{doc.get('server')}")
        a.wait_running("fo", 2)
    return (f"{p1} killed; revision 2 running {took:.1f} s after the apply through {p2}, "
            f"{st.get('server_failovers')} failover(s); status seqs strictly increasing "
            f"({len(seqs)}); --server {p2.url} on restart replaced the list")


class PgCluster:
    """A private PostgreSQL cluster (initdb in our temp dir, a free loopback port)."""

    def __init__(self, w):
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bindirs or not os.path.exists(os.path.join(bindirs[-1], "initdb")):
            raise Blocked("PostgreSQL's initdb is not installed (scripts/install-deps adds it)")
        self.bin = bindirs[-1]
        # Its own temp dir: the scenario's is 0700 and root's, which the postgres user cannot
        # enter.
        self.dir = tempfile.mkdtemp(prefix="outpost-e2e-pg-")
        self.port = free_port()
        self.user = []
        if os.geteuid() == 0:  # initdb refuses root: the cluster runs as the postgres user
            shutil.chown(self.dir, "postgres")
            self.user = ["runuser", "-u", "postgres", "--"]
        sh(*self.user, os.path.join(self.bin, "initdb"), "-D", self.dir + "/db", "-A", "trust",
           "-U", "outpost", timeout=120)
        sh(*self.user, os.path.join(self.bin, "pg_ctl"), "-D", self.dir + "/db", "-l",
           self.dir + "/pg.log", "-o", f"-k {self.dir} -p {self.port} "
           "-c listen_addresses=127.0.0.1 -c fsync=off", "start", "-w", timeout=120)
        self.url = f"postgres://outpost@127.0.0.1:{self.port}/postgres"
        say(f"PostgreSQL on port {self.port}")

    def close(self):
        sh(*self.user, os.path.join(self.bin, "pg_ctl"), "-D", self.dir + "/db", "stop", "-m",
           "immediate", check=False, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __str__(self):
        return f"PostgreSQL on {self.port}"


class Replica(Server):
    """`outpost server` on PostgreSQL with a DATA directory shared with the other replicas."""

    def __init__(self, world, name, data, db_url):
        self.shared_data = data
        super().__init__(world, name, "127.0.0.1", extra=["--db", db_url])

    def leader_since(self):
        m = re.findall(r"\[([0-9-]+ [0-9:.]+)\] \[info\] cluster: replica \S+ is the leader",
                       open(self.proc.log, errors="replace").read())
        return m[-1] if m else None


def scenario_replicas(w):
    """Two replicas on PostgreSQL; SIGKILL of the leader in the middle of a staged rollout."""
    pg = PgCluster(w)
    w.closers.append(pg)
    data = os.path.dirname(w.path("replicas-data", "x"))
    reps = []
    for name in ("a", "b"):
        # Server() takes DATA from world.path(name, "data"): make that the shared directory.
        link = w.path(f"server-replica-{name}", "data")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if not os.path.islink(link):
            os.symlink(data, link)
        reps.append(Server(w, f"server-replica-{name}", "127.0.0.1", extra=["--db", pg.url]))
    a, b = reps

    def leader_line(r):
        m = re.findall(r"\[([0-9-]+ [0-9:.]+)\] \[info\] cluster: replica \S+ is the leader",
                       open(r.proc.log, errors="replace").read())
        return m[-1] if m else None

    leader = wait_until("one replica leads", lambda: next((r for r in reps if leader_line(r)),
                                                          None), 15, 0.2)
    other = b if leader is a else a
    a.model("rep-m", "1.0.0", 81)
    b.model("rep-m", "2.0.0", 82)  # pushed through the other replica: one registry
    token = a.enroll_token("replicas", 3)
    manifest = w.path("manifests", "rep.yaml")

    def apply(server, version):
        with open(manifest, "w") as f:
            f.write("apiVersion: outpost/v1\nkind: Deployment\nmetadata: {name: rep}\n"
                    "spec:\n  selector: {sites: [\"replicas\"]}\n"
                    f"  model: {{name: rep-m, version: {version}}}\n"
                    "  serve:\n    route: /models/rep\n"
                    "  rollout:\n    waves: [1, 100%]\n    bake: 4s\n")
        server.cli(["apply", "-f", manifest])

    apply(a, "1.0.0")
    agents = [Agent(w, f"replicas-dev{i}") for i in range(3)]
    with Stopping(agents):
        for i, dev in enumerate(agents):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            dev.start(f"{first.url},{second.url}", token)
        for dev in agents:
            dev.wait_running("rep", 1, timeout=60)
            for _ in range(K):
                dev.infer("rep")
        apply(other, "2.0.0")  # through the follower: the leader rolls it out
        wait_until("the first wave updated one device",
                   lambda: sum(1 for d in agents if d.deployment("rep").get("current_revision")
                               == 2) >= 1, 30, 0.2)
        killed_at = time.time()
        leader.proc.kill()
        say(f"killed the leader {leader.name} (SIGKILL)")
        wait_until(f"{other.name} leads", lambda: leader_line(other), 10, 0.1,
                              [other.proc])
        took = time.time() - killed_at
        if took > 5:
            raise Failure(f"{other.name} took {took:.1f} s to lead after the kill (> 5 s)")
        for dev in agents:
            dev.wait_running("rep", 2, timeout=60)
            for _ in range(K):
                dev.infer("rep")
        wait_until("the rollout completed", lambda: other.cli_json(
            ["rollout", "status", "rep"]).get("state") == "completed", 30, 0.5, [other.proc])
        status = other.cli_json(["rollout", "status", "rep"])
        events = [h.get("event", "") for h in status.get("history", []) if isinstance(h, dict)]
        steps = [re.match(r"wave \d+ (started|settled)", e).group(0) for e in events
                 if re.match(r"wave \d+ (started|settled)", e)]
        if len(steps) != len(set(steps)):
            raise Failure(f"a wave step was taken twice: {events}")
        for dev in agents:
            seqs = other.status_seqs(dev.id)
            if seqs != sorted(set(seqs)):
                raise Failure(f"{dev.name}: status seqs repeat or go back: {seqs}")
            wait_until(f"{dev.name}: {2 * K} inferences counted",
                       lambda: other.inference_count(dev.id) >= 2 * K, 30, 0.5, [other.proc])
            counted = other.inference_count(dev.id)
            if counted != 2 * K:
                raise Failure(f"{dev.name}: {counted} inferences counted, {2 * K} made")
    return (f"{leader.name} killed mid-rollout; {other.name} led {took:.2f} s later; rollout "
            f"completed ({'; '.join(steps)}: no step twice); 3 "
            f"devices on revision 2, status seqs strictly increasing, {2 * K} inferences each "
            f"counted once")


RELEASE = "/api/v1/device/release/"
TS_PATH = RELEASE + "timestamp"
TG_PATH = RELEASE + "targets"


def scenario_release(w):
    """Signed release metadata against a lying mirror (TamperProxy between device and server)."""
    # --delta-bases 0: the attacks below are on whole blobs, which a delta would replace.
    s = Server(w, "server-release", "127.0.0.1", extra=["--release-timestamp-ttl", "4s",
                                                           "--delta-bases", "0"])
    keydir = os.path.dirname(w.path("release-root", "keys", "x"))
    s.cli(["release", "keys", "init", "--dir", keydir, "--keys", "3", "--threshold", "2"])
    proxy = TamperProxy("127.0.0.1", s.url, w.path("logs", "release-proxy.log"), "lying mirror")
    w.closers.append(proxy)
    seen = collections.defaultdict(list)  # release document path -> 200 bodies, in order

    def honest(method, path, status, data):
        if method == "GET" and status == 200 and path.startswith(RELEASE):
            seen[path].append(data)
        return None

    proxy.rewrite = honest
    a = Agent(w, "release-agent")
    rev = 0

    def deploy(version, seed):
        nonlocal rev
        _, size, digest = s.model("relmodel", f"1.{version}.0", seed)
        s.deploy("rel", "rel-site", "relmodel", f"1.{version}.0")
        rev += 1
        return size, digest

    def shown(needle, timeout=60):
        def find():
            out = s.cli(["device", "show", a.id]).stdout
            return next((ln.strip() for ln in out.splitlines() if needle in ln), None)
        line = wait_until(f"`outpost device show` says {needle!r}", find, timeout, 0.5, [a.proc])
        d = a.deployment("rel")
        if d.get("current_revision") == rev:
            raise Failure(f"revision {rev} was activated despite: {line}")
        return line

    results = []
    with Stopping([a]):
        deploy(1, 201)
        a.start(f"http://{proxy.addr}", s.enroll_token("rel-site", 1))
        a.wait_running("rel", rev, timeout=60)
        trust = a.status().get("release", {})
        if trust.get("state") != "trusted" or trust.get("root", {}).get("version") != 1:
            raise Failure(f"the agent does not trust root version 1: {trust}")
        old_ts, old_tg = seen[TS_PATH][-1], seen[TG_PATH][-1]
        deploy(2, 202)
        a.wait_running("rel", rev, timeout=60)

        # Rollback: older (validly signed) timestamp and targets than the device trusts.
        proxy.rewrite = lambda m, p, st, d: ((200, old_ts, None) if p == TS_PATH else
                                             (200, old_tg, None) if p == TG_PATH else None)
        deploy(3, 203)
        results.append(shown("rollback refused"))
        proxy.rewrite = honest
        a.wait_running("rel", rev, timeout=60)

        # Freeze: the mirror keeps serving one timestamp; it expires (4 s) and is refused.
        frozen = {}

        def freeze(m, p, st, d):
            if p == TS_PATH and st == 200:
                return 200, frozen.setdefault("ts", d), None
            return None

        proxy.rewrite = freeze
        w.local.request("GET", proxy.addr, TS_PATH, timeout=10)
        deploy(4, 204)
        results.append(shown("freeze refused"))
        proxy.rewrite = honest
        a.wait_running("rel", rev, timeout=60)

        # Mix-and-match: today's timestamp with a targets document of another day.
        proxy.rewrite = lambda m, p, st, d: (200, old_tg, None) if p == TG_PATH else None
        deploy(5, 205)
        results.append(shown("mix-and-match refused"))
        proxy.rewrite = honest
        a.wait_running("rel", rev, timeout=60)

        # Altered metadata: the timestamp's expiry moved to 2099, its signature kept.
        def alter(m, p, st, d):
            if p == TS_PATH and st == 200:
                doc = json.loads(d)
                doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
                return 200, json.dumps(doc).encode(), None
            return None

        proxy.rewrite = alter
        deploy(6, 206)
        results.append(shown("signature refused"))
        proxy.rewrite = honest
        a.wait_running("rel", rev, timeout=60)

        # Endless data: the blob is offered with a megabyte more than its signed length.
        size, digest = deploy(7, 207)
        junk = b"\0" * (1 << 20)

        def endless(m, p, st, d):
            if p == f"/api/v1/artifacts/{digest}" and st in (200, 206):
                return (st, b"", size + len(junk)) if m == "HEAD" else (st, d + junk, None)
            return None

        proxy.rewrite = endless
        results.append(shown("endless data refused"))
        proxy.rewrite = honest
        a.wait_running("rel", rev, timeout=90)

        # Root rotation with new root keys: the device walks root 1 -> 2 and keeps installing.
        s.cli(["release", "keys", "rotate", "--dir", keydir, "--new-root-keys"])
        deploy(8, 208)
        a.wait_running("rel", rev, timeout=60)
        trust = a.status().get("release", {})
        if trust.get("root", {}).get("version") != 2:
            raise Failure(f"after `release keys rotate` the agent trusts {trust}")
    return ("refused, each shown by `device show`: " + " | ".join(r[:110] for r in results) +
            "; honest again, each revision installed; root rotated 1 -> 2 and followed")


def scenario_relay_tls(w):
    """A relay serving its children over HTTPS with an operator's CA (made here with openssl)."""
    server = w.loop_server()
    token = server.enroll_token("tls-site", 3)
    server.model("tls-m", "1.0.0", 51)
    server.deploy("tls", "tls-site", "tls-m", "1.0.0")
    d = os.path.dirname(w.path("relay-tls", "x"))
    ca_key, ca, key, csr, cert = (os.path.join(d, n) for n in
                                  ("ca.key", "ca.pem", "relay.key", "relay.csr", "relay.pem"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh("openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2",
       "-subj", "/CN=site CA")
    sh("openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=relay")
    ext = os.path.join(d, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    sh("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
       "-out", cert, "-days", "2", "-extfile", ext)
    agents = []
    with Stopping(agents):
        relay = Agent(w, "tls-relay")
        relay.extra_args = ["--relay-tls-cert", cert, "--relay-tls-key", key,
                            "--relay-tls-ca", ca]
        agents.append(relay)
        relay.start(server.url, token, relay_listen="127.0.0.1:0")
        if not relay.relay_addr.startswith("https://"):
            raise Failure(f"relay.addr says {relay.relay_addr}, expected an https:// URL")
        relay.wait_running("tls", 1)  # its own workload, fetched from its cache over HTTPS
        # A device that does not trust the site CA is refused before it sends its token.
        stranger = Agent(w, "tls-stranger")
        r = subprocess.run(stranger.argv(relay.relay_url, token), env=w.env, capture_output=True,
                           text=True, timeout=60)
        if r.returncode == 0 or "not trusted" not in r.stderr + r.stdout:
            raise Failure(f"a device without --ca-file enrolled through the HTTPS relay, or "
                          f"failed without saying why (exit {r.returncode}): "
                          f"{(r.stderr or r.stdout)[-300:]}")
        dev = Agent(w, "tls-dev")
        dev.extra_args = ["--ca-file", ca]
        agents.append(dev)
        dev.start(relay.relay_url, token)
        dev.wait_running("tls", 1)
        dev.infer("tls")
        trust = dev.status().get("release", {})
        if trust.get("state") != "trusted":
            raise Failure(f"through the HTTPS relay the device does not trust release metadata: "
                          f"{trust}")
    return (f"relay on {relay.relay_addr} with an openssl-made site CA: the device with "
            f"--ca-file converged, served and verified release metadata; one without it was "
            f"refused ({r.stderr.strip().splitlines()[-1][:120]!r})")


def scenario_relay_evict(w):
    """A cache budget of 2K and a model of ~760 bytes: each new version leaves the previous
    blob unneeded, and the relay evicts the least recently served of those, never one a child's
    desired state references."""
    server = w.loop_server()
    token = server.enroll_token("evict", 2)
    agents = []
    with Stopping(agents):
        relay = Agent(w, "evict-relay")
        relay.extra_args = ["--relay-cache", "2K"]
        agents.append(relay)
        relay.start(server.url, token, relay_listen="127.0.0.1:0")
        dev = Agent(w, "evict-dev")
        agents.append(dev)
        cache_dir = os.path.join(relay.data, "relay", "artifacts", "sha256")
        digests = []
        for rev, seed in ((1, 51), (2, 52), (3, 53), (4, 54)):
            server.model("evict-m", f"{rev}.0.0", seed)
            server.deploy("evict", "evict", "evict-m", f"{rev}.0.0")
            if rev == 1:
                dev.start(relay.relay_url, token)
            dev.wait_running("evict", rev)
            dev.infer("evict")
            digests.append(sorted(os.listdir(cache_dir)))
        stats = relay.status()["relay"]["cache"]
        if stats["evictions"] < 2:
            raise Failure(f"expected at least 2 evictions after 4 versions, relay says {stats}")
        if stats["bytes"] > 2048:
            raise Failure(f"cache holds {stats['bytes']} bytes, over its 2K budget: {stats}")
        first = set(digests[0])
        left = set(os.listdir(cache_dir))
        if first & left:
            raise Failure(f"the oldest blob {first & left} is still cached: {sorted(left)}")
        newest = set(digests[3]) - set(digests[2])
        if not newest <= left:
            raise Failure(f"the running version's blob {newest} was evicted: {sorted(left)}")
        return (f"4 versions through a 2K cache: {stats['evictions']} evictions, "
                f"{stats['bytes']} bytes, {stats['blobs']} blobs kept; the running one kept")


SCENARIOS = [
    # name, function, needs the namespaces
    ("netns", scenario_netns, True),
    ("tamper", scenario_tamper, True),
    ("proxy", scenario_proxy, False),
    ("proxy-upper", scenario_proxy_upper, False),
    ("relay-converge", scenario_relay_converge, True),
    ("relay-cut", scenario_relay_cut, True),
    ("relay-enroll", scenario_relay_enroll, True),
    ("relay-chain", scenario_relay_chain, False),
    ("relay-evict", scenario_relay_evict, False),
    ("relay-tls", scenario_relay_tls, False),
    ("release", scenario_release, False),
    ("delta", scenario_delta, False),
    ("failover", scenario_failover, False),
    ("replicas", scenario_replicas, False),
]
GROUPS = {"all": [s[0] for s in SCENARIOS if s[0] not in ("release", "delta", "replicas")],
          "relay": [s[0] for s in SCENARIOS if s[0].startswith("relay")]}


def select(text):
    names = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        for name in GROUPS.get(part, [part]):
            if name not in [s[0] for s in SCENARIOS]:
                print(f"relay_e2e.py: unknown scenario {part!r}; known: "
                      f"{', '.join(list(GROUPS) + [s[0] for s in SCENARIOS])}", file=sys.stderr)
                sys.exit(2)
            if name not in names:
                names.append(name)
    return [s for s in SCENARIOS if s[0] in names]


def on_term(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--bin", default=os.path.join(here, "..", "..", "build", "bin"),
                    help="folder with outpost and outpost-agent")
    ap.add_argument("--scenarios", default="all",
                    help="comma-separated scenario names, or all / relay (default all)")
    ap.add_argument("--list", action="store_true", help="print the scenarios and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (kept on failure)")
    ap.add_argument("-v", "--verbose", action="store_true", help="say each step")
    args = ap.parse_args()
    VERBOSE = args.verbose
    if args.list:
        for name, _, needs_ns in SCENARIOS:
            print(f"{name}{'  (network namespaces)' if needs_ns else ''}")
        return 0
    chosen = select(args.scenarios)
    bin_dir = os.path.abspath(args.bin)
    for b in ("outpost", "outpost-agent"):
        if not os.path.exists(os.path.join(bin_dir, b)):
            time.sleep(5)  # a build may be replacing it
            if not os.path.exists(os.path.join(bin_dir, b)):
                print(f"relay_e2e.py: {bin_dir}/{b} not found (build first)", file=sys.stderr)
                return 2
    signal.signal(signal.SIGTERM, on_term)
    root = tempfile.mkdtemp(prefix="outpost-relay-e2e-")
    w = World(bin_dir, root)
    failed, passed = [], []
    ns_ctx = Namespaces() if any(needs for _, _, needs in chosen) else None
    try:
        if ns_ctx:
            try:
                w.ns = ns_ctx.__enter__()
            except (Unavailable, Failure) as e:
                print(f"SKIP relay_e2e: network namespaces cannot be made here: {e}", flush=True)
                return EXIT_SKIP
            w.site_client = NsClient(w.ns.site)
            w.closers.append(w.site_client)
        for name, fn, _ in chosen:
            started = len(w.procs)
            w.touched = set()
            t = time.time()
            say(f"--- {name}")
            try:
                reason = fn(w)
                passed.append(name)
                print(f"PASS {name} ({time.time() - t:.1f}s): {reason}", flush=True)
            except Failure as e:
                failed.append(name)
                print(f"FAIL {name} ({time.time() - t:.1f}s): {e}", flush=True)
                if isinstance(e, Blocked):
                    continue
                for p in w.procs[started:] + [p for p in w.procs[:started] if p in w.touched]:
                    print(f"  --- {p.name} ({p.log}), last lines:\n"
                          + "".join("    " + line for line in tail(p.log).splitlines(True)),
                          flush=True)
        problems = w.shutdown()
        if problems:
            failed.append("shutdown")
            print("FAIL shutdown: " + "\n  ".join(problems), flush=True)
    except KeyboardInterrupt as e:
        print(f"relay_e2e.py: interrupted ({e}); cleaning up", file=sys.stderr)
        failed.append("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        w.kill_all()
        for c in w.closers:
            try:
                c.close()
            except Exception:
                pass
        if ns_ctx:
            ns_ctx.close()
        if failed or args.keep:
            print(f"logs and data: {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.time() - T0
    print(f"{'FAIL' if failed else 'PASS'} relay_e2e: {len(passed)} of "
          f"{len(chosen)} scenario(s) passed in {total:.1f}s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
