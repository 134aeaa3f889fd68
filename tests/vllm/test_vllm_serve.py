"""docker-compose.yml's vLLM profile, without Docker: one datastore and two vLLM servers on 127.0.0.1.

The compose file is parsed and its own commands run (tests/integration/test_datastore_compose.py does the same
for the datastore side): the index-build job, the datastore service, and the vllm-a / vllm-b services with
their environment, rewritten only where a container differs from 127.0.0.1 (host, ports, the model folder
baked into the image, the datastore's address) plus ``--enforce-eager`` and a 1 GiB KV cache for a fast start
on a small CPU. The reference is the same node without speculation (vllm-a's command without
``--speculative-config`` and without SPECSTORE_*). The official ``openai`` client drives all three: at
temperature 0 chat, streaming and stop strings give the same text on both nodes as on the reference, and the
datastore's and vLLM's metrics show that the nodes drafted from the datastore.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import vllm  # noqa: F401 - this folder needs the vLLM environment: fail, do not skip, without it
import yaml
from openai import OpenAI

from specstore.client import vllm_proposer
from tests.integration.test_datastore_compose import free_port, mounts_of, resolve

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NODES = ("vllm-a", "vllm-b")
MODEL_IN_IMAGE = "/models/smollm2"           # Dockerfile.vllm bakes the converted model there
TOKEN = "compose-test-token"                 # DATASTORE_AUTH_TOKEN: the nodes must pass it on
PROMPTS = [
    "Explain Rust's ownership rules in two sentences.",
    "What does the borrow checker do?",
    "Write a Rust function that returns the length of a String.",
]
MAX_TOKENS = 32
START_TIMEOUT_S = 600


def hf_folder() -> Path:
    from specstore.datastore.model_files import resolve_model

    folder = resolve_model(None).cache_dir / "hf"
    assert (folder / "config.json").exists(), (
        f"{folder} is missing: the vLLM nodes need the converted SmolLM2 folder; make it once in the main "
        "environment: .venv/bin/python -c 'from specstore.client.models import model_folder; model_folder()'")
    return folder


def expand(value, variables: dict) -> str:
    """Compose's ${NAME:-default} interpolation."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: variables.get(m[1]) or (m[2] or ""), str(value))


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECSTORE_", "VLLM_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def set_arg(cmd: list[str], flag: str, value: str) -> None:
    assert flag in cmd, f"{flag} missing from {cmd}"
    cmd[cmd.index(flag) + 1] = value


def metric(body: str, name: str, **labels: str) -> float:
    """Sum of the Prometheus samples `name{...}` whose labels include `labels`."""
    total = 0.0
    for line in body.splitlines():
        m = re.match(r"^([\w:]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m[3])
    return total


def get(url: str, timeout: float = 5) -> str:
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, port: int):
        self.name, self.cmd, self.log, self.port = name, cmd, log, port
        self.url = f"http://127.0.0.1:{port}"
        self.fh = log.open("w")
        # own process group: vLLM's engine core is a child process, killed with the group
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self, n: int = 6000) -> str:
        self.fh.flush()
        return f"--- {self.name}: {' '.join(self.cmd)}\n" + self.log.read_text(errors="replace")[-n:]

    def wait_ready(self, deadline: float, paths=("/health", "/v1/models")) -> None:
        for path in paths:
            while True:
                assert self.proc.poll() is None, f"{self.name} exited ({self.proc.returncode})\n{self.tail()}"
                try:
                    get(self.url + path, timeout=3)
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{self.name}: no {path} in {START_TIMEOUT_S}s\n{self.tail()}"
                    time.sleep(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # stragglers of the group (the engine core)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.fh.close()


def vllm_node(service: dict, port: int, model: Path, datastore: str, variables: dict,
              speculative: bool = True) -> tuple[list[str], dict]:
    """The compose service's command and environment, for 127.0.0.1."""
    cmd = [model.as_posix() if p == MODEL_IN_IMAGE else p for p in resolve(service["command"], {})]
    set_arg(cmd, "--host", "127.0.0.1")
    set_arg(cmd, "--port", str(port))
    cmd.append("--enforce-eager")             # no torch.compile: start in about a minute
    env = {k: expand(v, variables) for k, v in service.get("environment", {}).items()}
    env["SPECSTORE_DATASTORE"] = env["SPECSTORE_DATASTORE"].replace("datastore:50051", datastore)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if not speculative:
        i = cmd.index("--speculative-config")
        del cmd[i:i + 2]
        env = {k: v for k, v in env.items() if not k.startswith("SPECSTORE_")}
    return cmd, env


def test_compose_vllm_services_shape():
    svc = COMPOSE["services"]
    assert (ROOT / "Dockerfile.vllm").exists()
    assert f"vllm-cpu=={vllm_proposer.VLLM_VERSION}" in (ROOT / "Dockerfile.vllm").read_text()
    ports = set()
    for name in NODES:
        node = svc[name]
        assert node["build"]["dockerfile"] == "Dockerfile.vllm"
        assert node["depends_on"]["datastore"]["condition"] == "service_healthy"
        assert node["healthcheck"]["test"][0] == "CMD" and "/health" in " ".join(node["healthcheck"]["test"])
        assert node["environment"]["SPECSTORE_DATASTORE"] == "datastore:50051"
        cmd = node["command"]
        spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
        assert spec["method"] == "custom_class" and spec["num_speculative_tokens"] > 0
        module, cls = spec["model"].rsplit(".", 1)
        assert getattr(__import__(module, fromlist=[cls]), cls) is vllm_proposer.SpecstoreProposer
        __import__(cmd[2], fromlist=["main"]).main    # the server module exists in the pinned vLLM
        ports.update(p.split(":")[0] for p in node["ports"])
    assert len(ports) == len(NODES)           # each node its own host port


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    """index-build job -> datastore -> vllm-a, vllm-b and the plain reference node, all on 127.0.0.1."""
    work = tmp_path_factory.mktemp("serve")
    model = hf_folder()
    variables = {"DATASTORE_AUTH_TOKEN": TOKEN}
    volume = work / "index-volume"
    volume.mkdir()
    host = {"corpus": ROOT / "examples" / "corpus", "index": volume}
    env = base_env()

    job = COMPOSE["services"]["index-build"]
    r = subprocess.run(resolve(job["command"], mounts_of(job, host)), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    servers: list[Server] = []
    try:
        ds = COMPOSE["services"]["datastore"]
        cmd = resolve(ds["command"], mounts_of(ds, host))
        port, mport = free_port(), free_port()
        set_arg(cmd, "--host", "127.0.0.1")
        set_arg(cmd, "--port", str(port))
        set_arg(cmd, "--metrics-port", str(mport))
        ds_env = {**env, **{k: expand(v, variables) for k, v in ds.get("environment", {}).items()}}
        datastore = Server("datastore", cmd, ds_env, work / "datastore.log", mport)
        servers.append(datastore)
        check = resolve([p.replace("50051", str(port)) for p in ds["healthcheck"]["test"][1:]], {})
        deadline = time.monotonic() + 120
        while subprocess.run(check, cwd=ROOT, env=env, capture_output=True, timeout=30).returncode != 0:
            assert datastore.proc.poll() is None and time.monotonic() < deadline, datastore.tail()
            time.sleep(0.5)

        nodes = {}
        for name, service, speculative in [("vllm-a", COMPOSE["services"]["vllm-a"], True),
                                           ("vllm-b", COMPOSE["services"]["vllm-b"], True),
                                           ("plain", COMPOSE["services"]["vllm-a"], False)]:
            p = free_port()
            cmd, node_env = vllm_node(service, p, model, f"127.0.0.1:{port}", variables, speculative)
            if speculative:
                node_env["SPECSTORE_STATS_FILE"] = str(work / f"stats-{name}.json")
            nodes[name] = Server(name, cmd, {**env, **node_env}, work / f"{name}.log", p)
            servers.append(nodes[name])
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in nodes.values():
            node.wait_ready(deadline)
        # the compose healthcheck command itself, against each node
        for name in NODES:
            test = COMPOSE["services"][name]["healthcheck"]["test"][1:]
            h = subprocess.run(resolve([t.replace(":8000/", f":{nodes[name].port}/") for t in test], {}),
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
            assert h.returncode == 0, h.stderr[-2000:]
        yield {"datastore": datastore, "nodes": nodes, "work": work,
               "model": COMPOSE["services"]["vllm-a"]["command"][
                   COMPOSE["services"]["vllm-a"]["command"].index("--served-model-name") + 1]}
    finally:
        for s in reversed(servers):
            s.stop()


def chat(node: Server, model: str, prompt: str, **kw):
    client = OpenAI(base_url=node.url + "/v1", api_key="EMPTY", timeout=300, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=MAX_TOKENS, seed=0, **kw)


def streamed(node: Server, model: str, prompt: str, **kw) -> tuple[str, str]:
    text, finish = [], None
    for chunk in chat(node, model, prompt, stream=True, **kw):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish


@pytest.fixture(scope="module")
def plain(topology):
    """The reference node's greedy text per prompt."""
    out = {}
    for p in PROMPTS:
        r = chat(topology["nodes"]["plain"], topology["model"], p)
        out[p] = r.choices[0].message.content
        assert out[p] and r.usage.completion_tokens == MAX_TOKENS, r
    return out


def test_chat_equals_the_node_without_speculation(topology, plain):
    for name in NODES:
        for p in PROMPTS:
            r = chat(topology["nodes"][name], topology["model"], p)
            assert r.choices[0].message.content == plain[p], (name, p)
            assert r.usage.completion_tokens == MAX_TOKENS


def test_streaming_equals_the_node_without_speculation(topology, plain):
    for name in NODES:
        for p in PROMPTS:
            text, finish = streamed(topology["nodes"][name], topology["model"], p)
            assert (text, finish) == (plain[p], "length"), (name, p)


def stop_string(text: str) -> str:
    """A word from the second half of the reference text, whose first occurrence is well inside it."""
    words = re.findall(r"[A-Za-z]{4,}", text)
    for w in words[len(words) // 2:]:
        if text.index(w) >= 20:
            return w
    pytest.fail(f"no stop word in {text!r}")


def test_stop_strings_cut_the_same_text(topology, plain):
    for p in PROMPTS[:2]:
        stop = stop_string(plain[p])
        want = plain[p][:plain[p].index(stop)]
        for name in ("plain", *NODES):
            r = chat(topology["nodes"][name], topology["model"], p, stop=[stop])
            assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop"), (name, p, stop)
        text, finish = streamed(topology["nodes"]["vllm-b"], topology["model"], p, stop=[stop])
        assert (text, finish) == (want, "stop"), ("vllm-b streamed", p, stop)


def test_both_nodes_drafted_from_the_datastore(topology, plain):
    ds = get(topology["datastore"].url + "/metrics")
    assert metric(ds, "datastore_requests_total", method="RetrieveBatch", code="OK") > 0, ds[-3000:]
    assert metric(ds, "datastore_lookups_total", outcome="hit") > 0
    # sessions need the compose file's DATASTORE_AUTH_TOKEN: the nodes got it through SPECSTORE_AUTH_TOKEN
    assert metric(ds, "datastore_requests_total", method="OpenSession", code="OK") >= len(NODES)
    for name in NODES:
        body = get(topology["nodes"][name].url + "/metrics")
        assert metric(body, "vllm:spec_decode_num_drafts_total") > 0, name
        assert metric(body, "vllm:spec_decode_num_accepted_tokens_total") > 0, name
        # the proposer's counters (rewritten when it sees a request start or end): each prompt was followed
        s = json.loads((topology["work"] / f"stats-{name}.json").read_text())
        assert s["requests_started"] >= len(PROMPTS) and s["proposed_tokens"] > 0 and s["errors"] == 0, (name, s)
    plain_metrics = get(topology["nodes"]["plain"].url + "/metrics")
    assert metric(plain_metrics, "vllm:spec_decode_num_drafts_total") == 0
