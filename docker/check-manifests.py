#!/usr/bin/env python3
"""Renders every kustomize target under docker/kubernetes, validates each
object strictly against the Kubernetes schemas (kubernetes-validate, offline)
and checks the security posture of the workloads.

Exit status 0 when everything holds; otherwise each problem is printed.
"""
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kubernetes")
TARGETS = [ROOT] + [
    os.path.join(ROOT, "overlays", d) for d in sorted(os.listdir(os.path.join(ROOT, "overlays")))
]
# Custom resources have no built-in schema; they are checked by hand below.
CRD_KINDS = {"ServiceMonitor"}
# The only added capabilities allowed, per workload or workload/container.
ALLOWED_CAPS = {
    "tunnel-redirector": {"NET_ADMIN", "NET_RAW"},
    # Gives the agent's hostPath certificate directory to its user.
    "tunnel-agent/cert-dir": {"CHOWN", "FOWNER"},
}
# Workloads allowed on the host network.
HOST_NETWORK = {"tunnel-agent", "tunnel-redirector"}
# Workloads (or workload/container) that must run as root (iptables,
# chown), all others must not.
ROOT_OK = {"tunnel-redirector", "tunnel-agent/cert-dir"}

problems = []

MI = 1 << 20
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def size(text):
    """A Kubernetes binary quantity (256Mi) or plain bytes."""
    for unit, factor in UNITS.items():
        if text.endswith(unit) or text.endswith(unit + "B"):
            return int(text.rstrip("B")[: -len(unit)]) * factor
    return int(text)


def flag(args, name, default):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def server_memory_bound(args):
    """The tunnel-server's worst case from its flags (SECURITY.md, "Sizing
    memory from the limits"): received data and what each tunnel holds
    around it (measured at 4-5x the windows), relay buffers, handshakes in
    flight, the rest, and the kernel socket memory of client connections
    (a first receive buffer each), which cgroup v2 charges to the pod."""
    budget = size(flag(args, "receive-budget", "256Mi"))
    clients = int(flag(args, "max-client-connections", "8192"))
    handshakes = int(flag(args, "max-handshakes", "1024"))
    relay = size(flag(args, "relay-buffer-budget", "16Mi"))
    return (
        5 * budget
        + clients * (8 + 128) * 1024
        + relay
        + 2 * handshakes * 35 * 1024
        + 64 * MI
    )


def check_server_memory(target, cname, container):
    """A tunnel-server container's memory limit must hold what its flags
    allow, or the kernel kills it exactly when its limits are doing their job."""
    command = container.get("command") or ["tunnel-server"]
    args = container.get("args", [])
    if not command[-1].endswith("tunnel-server") or (args and args[0] == "dnat"):
        return
    for a in args:
        if a.startswith("--max-client-connections") and "=" not in a:
            problem(target, f"{cname}: write --max-client-connections=N (the check reads it)")
    if not any(a.startswith("--max-client-connections=") for a in args):
        problem(
            target,
            f"{cname}: set --max-client-connections: its default follows the open-files "
            "limit, so the memory it needs cannot be known from the manifest",
        )
    limit = container.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        return
    bound = server_memory_bound(args)
    if size(limit) < bound:
        problem(
            target,
            f"{cname}: limits.memory {limit} is below what its flags allow "
            f"({bound // MI}Mi: 5 x --receive-budget + (8 KiB + 128 KiB of kernel socket "
            "memory) x --max-client-connections + --relay-buffer-budget "
            "+ 70 KiB x --max-handshakes + 64Mi)",
        )


def problem(target, msg):
    problems.append(f"{os.path.relpath(target, ROOT) or '.'}: {msg}")


def check_workload(target, obj):
    name = obj["metadata"]["name"]
    pod = obj["spec"]["template"]["spec"]
    if pod.get("automountServiceAccountToken") is not False:
        problem(target, f"{name}: service account token is mounted")
    if pod.get("hostNetwork") and name not in HOST_NETWORK:
        problem(target, f"{name}: hostNetwork is not expected")
    for key in ("hostPID", "hostIPC"):
        if pod.get(key):
            problem(target, f"{name}: {key} is set")
    pod_sc = pod.get("securityContext", {})
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        cname = f"{name}/{c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            problem(target, f"{cname}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(target, f"{cname}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(target, f"{cname}: root filesystem is writable")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problem(target, f"{cname}: capabilities are not dropped (drop: [ALL])")
        allowed = ALLOWED_CAPS.get(name, set()) | ALLOWED_CAPS.get(cname, set())
        extra = set(caps.get("add", [])) - allowed
        if extra:
            problem(target, f"{cname}: unexpected capabilities {sorted(extra)}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if name not in ROOT_OK and cname not in ROOT_OK and non_root is not True:
            problem(target, f"{cname}: may run as root (runAsNonRoot is not true)")
        check_server_memory(target, cname, c)
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problem(target, f"{cname}: no {kind}.{r}")


def check_service_monitor(target, obj):
    spec = obj.get("spec", {})
    if not spec.get("selector", {}).get("matchLabels") or not spec.get("endpoints"):
        problem(target, "ServiceMonitor without selector or endpoints")


def workspace_version():
    """The version in the workspace's Cargo.toml ([workspace.package])."""
    path = os.path.join(os.path.dirname(ROOT), "..", "Cargo.toml")
    section = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[workspace.package]" and line.startswith("version"):
                return line.split("=", 1)[1].strip().strip('"')
    raise SystemExit("no [workspace.package] version in Cargo.toml")


# The images docker/build-images.sh builds, by repository name.
BUILT_IMAGES = {"edge-tunnel", "edge-tunnel-dnat"}


def check_images(target, objects):
    """Every container runs an image docker/build-images.sh builds, at the
    workspace version: a manifest that names anything else cannot be run."""
    version = workspace_version()
    for obj in objects:
        if obj["kind"] not in ("Deployment", "DaemonSet", "StatefulSet"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            ref = c["image"]
            name, _, tag = ref.rpartition(":")
            repo = name.rsplit("/", 1)[-1]
            if repo not in BUILT_IMAGES or tag != version:
                problem(
                    target,
                    f"{obj['metadata']['name']}/{c['name']}: image {ref} is not one "
                    f"docker/build-images.sh builds ({', '.join(sorted(BUILT_IMAGES))} "
                    f"tagged {version})",
                )


def connect_ports(objects):
    """The container ports of the tunnel-server Deployment's CONNECT
    listeners (named connect), by number."""
    ports = set()
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            for port in c.get("ports", []):
                if port.get("name") == "connect":
                    ports.add(port["containerPort"])
    return ports


def check_network_policy(target, objects):
    """The CONNECT port proxies to every edge node: a NetworkPolicy must
    select the server pods and admit that port only from selected pods."""
    ports = connect_ports(objects)
    if not ports:
        return
    policies = [
        o for o in objects
        if o["kind"] == "NetworkPolicy"
        and o["spec"].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
        == "tunnel-server"
    ]
    if not policies:
        problem(target, "no NetworkPolicy selects the tunnel-server pods (CONNECT port open to every pod)")
        return
    for policy in policies:
        if "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
            problem(target, f"NetworkPolicy {policy['metadata']['name']} does not restrict ingress")
        for rule in policy["spec"].get("ingress", []):
            rule_ports = {p.get("port") for p in rule.get("ports", [])} or {None}
            opens_connect = None in rule_ports or bool(rule_ports & ports)
            if not opens_connect:
                continue
            sources = rule.get("from")
            if not sources or any("ipBlock" in s or "podSelector" not in s for s in sources):
                problem(
                    target,
                    f"NetworkPolicy {policy['metadata']['name']} admits the CONNECT port "
                    f"{sorted(ports)} from more than selected pods",
                )


def main():
    for target in TARGETS:
        rendered = subprocess.run(
            ["kubectl", "kustomize", target], capture_output=True, text=True
        )
        if rendered.returncode != 0:
            problem(target, f"kubectl kustomize failed: {rendered.stderr.strip()}")
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(rendered.stdout)
            path = f.name
        validated = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", path], capture_output=True, text=True
        )
        output = (validated.stdout + validated.stderr).strip()
        for line in output.splitlines():
            if line.startswith("WARN") and any(f"kind {k} " in line for k in CRD_KINDS):
                continue
            problem(target, f"schema: {line}")
        if validated.returncode != 0 and not output:
            problem(target, "kubernetes-validate failed")
        os.unlink(path)
        objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
        kinds = {o["kind"] for o in objects}
        for rbac in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
            if rbac in kinds:
                problem(target, f"{rbac} present, but no component calls the Kubernetes API")
        check_network_policy(target, objects)
        check_images(target, objects)
        for obj in objects:
            if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
                check_workload(target, obj)
            elif obj["kind"] == "ServiceMonitor":
                check_service_monitor(target, obj)
        print(f"ok: {os.path.relpath(target, ROOT) or '.'}: {len(objects)} objects")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
