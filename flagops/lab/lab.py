"""`lab up`, `lab down` and `lab status`: the steps, in order, and what each found.

``up`` is idempotent: every step first checks what exists and only builds or starts
what is missing. Caches (images, the rootfs, registry data, node docker data, the
published model, the git repo) survive ``down``; ``down --purge`` removes them too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors

from flagops.lab import LabError, Progress, engine, nodes, procs, services
from flagops.lab.paths import LabPaths

IMAGE_REPO = "flagrelease/flagrelease"
IMAGE_TAG = "lab"
IMAGE_REF = f"{services.GATEWAY}:{services.REGISTRY_PORT}/{IMAGE_REPO}:{IMAGE_TAG}"  # what nodes pull
PUSH_REPO = f"{services.LOOPBACK}:{services.REGISTRY_PORT}/{IMAGE_REPO}"  # same registry, host side
MODEL_NAME = "ERNIE-4.5-tiny-MoE"
FACTS_FILE = "lab.json"


@contextlib.contextmanager
def _lab_lock(paths: LabPaths) -> Iterator[None]:
    """One `lab up`/`lab down` at a time."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / "lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabError(f"another `flagops lab` command holds {paths.root / 'lock'}") from None
        yield


class _Steps:
    """Times each step and keeps its result for the --json report."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.report: dict[str, Any] = {"steps": {}}

    def run(self, name: str, func: Callable[[], Any]) -> Any:
        start = time.monotonic()
        result = func()
        self.report["steps"][name] = round(time.monotonic() - start, 2)
        return result


def _commented(text: str, comment: str) -> str:
    """``text`` padded to the inventory's comment column (48), then ``# comment``."""
    return f"{text:<47}# {comment}"


def children_text(lab_nodes: tuple[nodes.Node, ...]) -> str:
    """The inventory's ``children:`` block for ``lab_nodes`` (node1 the master), laid out as
    in ``inventories/lab.yaml`` (whose block this gives back, byte for byte, for two nodes)."""
    master, *workers = lab_nodes
    lines = ["  children:",
             _commented("    master:", "Ray head, first hostfile line, runs `flagscale serve`"),
             "      hosts:"]

    def host(node: nodes.Node) -> list[str]:
        return [_commented(f"        {node.hostname}:", f"container {node.container}"),
                _commented(f"          ansible_host: {node.ip}", "fixed address on the lab bridge")]

    lines += host(master)
    if workers:
        lines += [_commented("    workers:", "reached by the master container over ssh"), "      hosts:"]
        for node in workers:
            lines += host(node)
    else:
        lines.append("    # one node: no workers group, so no SSH trust (FlagScale writes no ssh command)")
    return "\n".join(lines) + "\n"


PP_LINE = re.compile(r"(?m)^(\s+pipeline_parallel_size: )\d+")
OVERRIDES_LINE = re.compile(r"(?m)^    flagops_release_overrides:.*\n")
TOPOLOGY_NODES = re.compile(r"(?m)^(      topology:[^\n]*\n(?:        [^\n]*\n)*?        nodes: )\d+")


def _release_has_topology() -> bool:
    """Whether releases state their node count (``topology.nodes`` in the release schema):
    validate then checks it against the inventory, so a resized lab overrides it."""
    from flagops import config

    return "topology" in config.load_schema("release").get("properties", {})


def sized_inventory(text: str, count: int, topology: bool | None = None) -> str:
    """``inventories/lab.yaml`` resized to ``count`` nodes: one pipeline stage per node
    (``pipeline_parallel_size: count``, TP stays 1) and the hosts node1..node<count>; where
    releases carry ``topology.nodes`` (``topology``; default: the release schema says),
    the overrides set it to ``count`` too. Only data changes; two nodes give ``text`` back
    unchanged."""
    lab_nodes = nodes.lab_nodes(count)
    at = text.find("\n  children:\n")
    if at < 0 or not PP_LINE.search(text):
        raise LabError("inventories/lab.yaml has no `children:` block or no pipeline_parallel_size to resize")
    head = PP_LINE.sub(lambda m: m.group(1) + str(count), text[: at + 1], count=1)
    if count != nodes.DEFAULT_NODES and (_release_has_topology() if topology is None else topology):
        if TOPOLOGY_NODES.search(head):
            head = TOPOLOGY_NODES.sub(lambda m: m.group(1) + str(count), head, count=1)
        elif (m := OVERRIDES_LINE.search(head)) is not None:
            head = (head[: m.end()] + "      topology:\n"
                    + _commented(f"        nodes: {count}", f"the lab at {count} node{'s' * (count > 1)}") + "\n"
                    + head[m.end():])
        else:
            raise LabError("inventories/lab.yaml has no flagops_release_overrides to set topology.nodes in")
    out = head + children_text(lab_nodes)
    if count != nodes.DEFAULT_NODES:
        out = (f"# Generated by `flagops lab up --nodes {count}` from inventories/lab.yaml: {count} node"
               f"{'s' * (count > 1)}, pipeline parallel {count}\n# (one stage per node), TP 1. Only the size "
               "differs; the comments below describe the default two-node lab.\n" + out)
    return out


def write_inventory(paths: LabPaths, commit: str, name: str = "lab.yaml", count: int = nodes.DEFAULT_NODES) -> Path:
    """``<lab>/inventory.yaml``: the shipped ``inventories/lab.yaml`` (comments kept) with
    this lab's key, known_hosts and FlagScale commit, so an installed flagops (no checkout)
    has an inventory to provision: ``flagops provision ~/.flagops/lab/inventory.yaml``.
    ``count`` other than 2 (``lab up --nodes N``): the same inventory at that size
    (:func:`sized_inventory`)."""
    from flagops import resources

    text = resources.data("inventories", name).read_text(encoding="utf-8")
    text = text.replace("~/.flagops/lab/", f"{paths.root}/")
    text = re.sub(r"(?m)^(\s+commit: )[0-9a-f]{40}", lambda m: m.group(1) + commit, text)
    text = sized_inventory(text, count)
    # bastion mode (`lab up --bastion`): lab-bastion.yaml, the same with the ProxyJump
    out = paths.root / ("inventory.yaml" if name == "lab.yaml" else "inventory-bastion.yaml")
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return out


def up(paths: LabPaths, progress: Progress, bastion: bool = False, count: int = nodes.DEFAULT_NODES) -> dict[str, Any]:
    """Bring the whole lab up; returns facts and per-step seconds. ``bastion``: the nodes
    only through a jump host (:mod:`flagops.lab.bastion`); without it that mode is undone.
    ``count``: how many nodes (1..4, default 2); nodes beyond it are removed."""
    lab_nodes = nodes.lab_nodes(count)
    if bastion and count != nodes.DEFAULT_NODES:
        raise LabError(f"bastion mode is the {nodes.DEFAULT_NODES}-node lab only (inventories/lab-bastion.yaml); "
                       f"drop --bastion or --nodes {count}")
    try:
        from flagops.lab.flagos_image import ensure_image
        from flagops.lab.flagscale_repo import ensure_repo
        from flagops.lab.tiny_model import ensure_model
        from flagops.lab.vllm_repo import ensure_repo as ensure_vllm_repo
    except ImportError as exc:
        raise LabError(f"this checkout lacks a lab builder ({exc.name}); cannot bring the lab up") from exc

    started = time.monotonic()
    steps = _Steps(progress)
    with _lab_lock(paths):
        steps.run("host_packages", lambda: engine.ensure_apt_packages(engine.missing_tools(), progress))
        client = steps.run("engine", lambda: engine.ensure_engine(paths, progress))
        node_image = steps.run("node_image", lambda: nodes.ensure_node_image(client, paths, progress))
        steps.run("ssh_keys", lambda: nodes.ensure_ssh_keys(paths, lab_nodes))
        steps.run("network", lambda: nodes.ensure_network(client, progress))
        steps.run("services", lambda: services.ensure_services(paths, progress))
        removed = steps.run("nodes", lambda: nodes.ensure_nodes(client, node_image, paths, progress, lab_nodes))
        if removed:
            from flagops.lab.bastion import close_ansible_masters

            close_ansible_masters(progress, removed)
        steps.run("bastion", lambda: _bastion_mode(client, node_image, paths, progress, bastion))
        steps.run("hub_trust", lambda: _trust_hub_ca(client, paths, progress, lab_nodes))
        nodes.prune_node_images(client, keep=node_image)
        local = steps.run("flagos_image", lambda: ensure_image(client, paths.cache, progress))
        digest = steps.run("push", lambda: push_image(client, local, progress, paths))
        model = steps.run("model", lambda: ensure_model(client, local, paths.published, progress))
        vllm_commit = steps.run("vllm_repo", lambda: ensure_vllm_repo(paths.git, paths.cache, progress))
        commit = steps.run("git_repo", lambda: ensure_repo(paths.git, paths.cache, progress, vllm_commit))
    facts = {
        "image": IMAGE_REF,
        "image_digest": digest,
        "model": Path(model).name,
        "model_url": f"http://{services.GATEWAY}:{services.MODEL_PORT}/{Path(model).name}/",
        "hub": f"{services.GATEWAY}:{services.HUB_PORT}",
        "hub_model": "flagops-lab/" + Path(model).name,
        "hub_token_file": str(paths.root / "hub" / "token"),
        "registry_user": services.REGISTRY_USER,
        "registry_password_file": str(services.registry_auth_dir(paths) / "password"),
        "registry_password_env": services.REGISTRY_PASSWORD_ENV,
        "flagscale_repo": f"git://{services.GATEWAY}/FlagScale.git",
        "flagscale_commit": commit,
        "vllm_repo": f"git://{services.GATEWAY}/vllm.git",
        "vllm_commit": vllm_commit,
        "node_image": node_image,
        "ssh_key": str(paths.ssh_key),
        "known_hosts": str(paths.known_hosts),
        "mode": "bastion" if bastion else "default",
        "nodes": count,
        "hosts": {n.hostname: n.ip for n in lab_nodes},
    }
    (paths.root / FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    facts["inventory"] = str(write_inventory(paths, commit, "lab-bastion.yaml" if bastion else "lab.yaml", count))
    steps.report.update(facts, ok=True, seconds=round(time.monotonic() - started, 2))
    return steps.report


def _bastion_mode(client: docker.DockerClient, image: str, paths: LabPaths, progress: Progress, on: bool) -> None:
    from flagops.lab import bastion

    if on:
        bastion.ensure(client, image, paths, progress)
    elif bastion.remove(client, paths, progress):
        progress("bastion mode: off (the default lab)")


def _trust_hub_ca(client: docker.DockerClient, paths: LabPaths, progress: Progress,
                  lab_nodes: tuple[nodes.Node, ...]) -> None:
    from flagops.lab import hub_lab

    hub_lab.trust_ca(client, paths, [n.container for n in lab_nodes], progress)


def _registry_digest(auth: dict[str, str]) -> str | None:
    """The digest the lab registry holds for ``flagrelease/flagrelease:lab``, if any."""
    url = f"http://{services.LOOPBACK}:{services.REGISTRY_PORT}/v2/{IMAGE_REPO}/manifests/{IMAGE_TAG}"
    accept = "application/vnd.docker.distribution.manifest.v2+json"
    headers = {"Accept": accept, **services.basic_auth(auth["username"], auth["password"])}
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.headers.get("Docker-Content-Digest")
    except (urllib.error.URLError, OSError):
        return None


def registry_auth_config(paths: LabPaths) -> dict[str, str]:
    """The lab registry's login as the docker SDK takes it (``auth_config``): sent with the
    request (X-Registry-Auth), never written to a docker config file."""
    return {"username": services.REGISTRY_USER, "password": services.registry_password(paths)}


def push_image(client: docker.DockerClient, local: str, progress: Progress, paths: LabPaths) -> str:
    """Tag ``local`` as the lab image, push it unless the registry holds it; returns the digest."""
    auth = registry_auth_config(paths)
    image = client.images.get(local)
    held = _registry_digest(auth)
    if held and f"{PUSH_REPO}@{held}" in image.attrs.get("RepoDigests", []):
        progress(f"registry: {IMAGE_REF} up to date ({held[:19]})")
        return held
    image.tag(PUSH_REPO, IMAGE_TAG)
    progress(f"registry: pushing {local} as {IMAGE_REF}")
    for event in client.api.push(PUSH_REPO, tag=IMAGE_TAG, stream=True, decode=True, auth_config=auth):
        if "error" in event:
            raise LabError(f"push of {PUSH_REPO}:{IMAGE_TAG} failed: {event['error']}")
    held = _registry_digest(auth)
    if not held:
        raise LabError(f"registry holds no {IMAGE_REPO}:{IMAGE_TAG} after the push")
    return held


def down(paths: LabPaths, progress: Progress, purge: bool = False) -> dict[str, Any]:
    """Remove the nodes, network and host services (and, with ``purge``, every cache)."""
    with _lab_lock(paths):
        client = engine.connect()
        if client is not None:
            from flagops.lab import bastion

            bastion.remove(client, paths, progress)
            nodes.remove_nodes(client, paths, progress)
            bastion.close_ansible_masters(progress, nodes.ALL_NODES)
            nodes.remove_network(client, progress)
        services.stop_services(paths, progress)
        if purge and client is not None:
            _remove_lab_images(client, progress)
        engine.stop_engine(paths, client, progress)
        if purge:
            for child in paths.root.iterdir():
                if child.name == "lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            progress(f"purged {paths.root}")
    return {"ok": True, "purged": purge, "left": leftovers(paths)}


def _remove_lab_images(client: docker.DockerClient, progress: Progress) -> None:
    for image in client.images.list():
        tags = [t for t in image.tags if t.startswith(("flagops-lab/", f"{PUSH_REPO}:"))]
        for tag in tags:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(tag, noprune=False)
        if tags:
            progress(f"removed image {', '.join(tags)}")


def leftovers(paths: LabPaths) -> dict[str, list[str]]:
    """What a clean `lab down` must not leave: containers, networks, processes, cgroup dirs."""
    out: dict[str, list[str]] = {"containers": [], "networks": [], "processes": [], "cgroups": []}
    client = engine.connect()
    if client is not None:
        label = {"label": f"{nodes.LAB_LABEL}=1"}
        out["containers"] = [c.name for c in client.containers.list(all=True, filters=label)]
        out["networks"] = [n.name for n in client.networks.list(filters=label)]
    out["processes"] = [n for n in procs.names(paths.pids) if procs.alive(procs.read(paths.pids, n))]
    for node in nodes.ALL_NODES:
        id_file = paths.node_dir(node.hostname) / "container-id"
        if id_file.exists():
            out["cgroups"] += [str(d) for d in nodes.stale_cgroup_dirs(id_file.read_text().strip())]
    return out


def status(paths: LabPaths) -> dict[str, Any]:
    """Each component: up or down, with details."""
    client = engine.connect()
    report: dict[str, Any] = {"engine": engine.engine_status(paths, client)}
    if client is not None:
        try:
            net = client.networks.get(nodes.NETWORK)
            report["network"] = {
                "up": True,
                "detail": f"{nodes.SUBNET} on {nodes.BRIDGE}",
                "id": net.short_id,
            }
        except docker.errors.NotFound:
            report["network"] = {"up": False}
        report["size"] = lab_size(paths)
        report["nodes"] = nodes.nodes_status(client, paths, nodes.lab_nodes(report["size"]))
        from flagops.lab import bastion

        report["bastion"] = bastion.status(client)
    report["services"] = services.services_status(paths)
    try:
        digest = _registry_digest(registry_auth_config(paths))
    except OSError:  # no password yet: the lab was never up with a registry login
        digest = None
    report["image"] = {"up": digest is not None, "ref": IMAGE_REF, "digest": digest}
    manifest = paths.published / MODEL_NAME / "manifest.json"
    report["model"] = {"up": manifest.is_file(), "path": str(manifest.parent)}
    repo = paths.git / "FlagScale.git"
    report["git_repo"] = {"up": repo.is_dir(), "path": str(repo)}
    vllm_git = paths.git / "vllm.git"
    report["vllm_repo"] = {"up": vllm_git.is_dir(), "path": str(vllm_git)}
    facts = paths.root / FACTS_FILE
    if facts.is_file():
        report["facts"] = json.loads(facts.read_text())
    report["ok"] = _all_up(report)
    return report


def lab_size(paths: LabPaths) -> int:
    """The node count of the last `lab up` (its facts; 2 before the lab recorded one)."""
    facts = paths.root / FACTS_FILE
    try:
        count = int(json.loads(facts.read_text()).get("nodes", nodes.DEFAULT_NODES))
    except (OSError, ValueError, TypeError, AttributeError):
        return nodes.DEFAULT_NODES
    return count if 1 <= count <= nodes.MAX_NODES else nodes.DEFAULT_NODES


def _all_up(report: dict[str, Any]) -> bool:
    parts = [
        report["engine"],
        report.get("network", {"up": False}),
        report["image"],
        report["model"],
        report["git_repo"],
        report["vllm_repo"],
        *(n for n in report.get("nodes", {}).values() if not n.get("extra")),
        *report["services"].values(),
    ]
    if report.get("bastion", {}).get("mode") == "bastion":
        parts.append(report["bastion"])
    return bool(report.get("nodes")) and all(p.get("up") for p in parts)
