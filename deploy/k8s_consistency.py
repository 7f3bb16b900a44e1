"""Checks that the Kubernetes manifests agree with each other and with the
container image, which no schema can: names, labels, ports and paths.

Usage: python k8s_consistency.py MANIFESTS.yaml DOCKERFILE
(MANIFESTS.yaml: the output of `kubectl kustomize deploy/k8s`, one pod on
sled in a StatefulSet, or of `kubectl kustomize deploy/k8s-postgres`, several
pods on PostgreSQL in a Deployment). Run by deploy/check.
"""
import re
import sys

import yaml


def main(manifests_path, dockerfile_path):
    docs = [d for d in yaml.safe_load_all(open(manifests_path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    (sts,) = workloads
    shared = sts["kind"] == "Deployment"
    (monitor,) = by_kind["ServiceMonitor"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    pod = sts["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = image_env(dockerfile_path)
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    pod_labels = pod["metadata"]["labels"]
    check(sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), f"{sts['kind']} selector misses its pods")
    if not shared:
        governing = services.get(sts["spec"]["serviceName"])
        check(governing is not None and governing["spec"].get("clusterIP") == "None",
              "StatefulSet serviceName is not a headless Service")
    for name, svc in services.items():
        check(svc["spec"]["selector"].items() <= pod_labels.items(), f"Service {name} selects no hookrelay pod")
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {name} targets port {p['targetPort']!r}, not a container port")

    # The ServiceMonitor must find the admin Service, scrape its admin port,
    # and name the job "hookrelay" (what alerts.yaml and the dashboard expect).
    selected = [s for s in services.values()
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"].get("labels", {}).items()]
    check(len(selected) == 1, f"ServiceMonitor selects {len(selected)} Services, not the admin one alone")
    for svc in selected:
        names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in monitor["spec"]["endpoints"]:
            check(ep["port"] in names, f"ServiceMonitor scrapes port {ep['port']!r}, which Service has not")
            check(ep.get("path", "/metrics") == "/metrics", "ServiceMonitor does not scrape /metrics")
        job = svc["metadata"].get("labels", {}).get(monitor["spec"].get("jobLabel", ""), svc["metadata"]["name"])
        check(job == "hookrelay", f'the scrape job would be {job!r}, the alerts expect "hookrelay"')

    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        check(get["port"] == "admin", f"{probe} is not on the admin port")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readinessProbe is not /readyz")

    # The image's addresses and paths against the pod's ports and volumes.
    listen_port = lambda var: int(env[var].rsplit(":", 1)[1])
    check(ports.get("webhooks") == listen_port("HOOKRELAY_LISTEN"), "webhooks port differs from the image's HOOKRELAY_LISTEN")
    check(ports.get("admin") == listen_port("HOOKRELAY_ADMIN_LISTEN"), "admin port differs from the image's HOOKRELAY_ADMIN_LISTEN")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    config = mounts["config"]
    check(config["mountPath"] == env["HOOKRELAY_CONFIG"] and config.get("subPath") == "routes.yaml",
          "routes.yaml is not mounted at the image's HOOKRELAY_CONFIG")
    check(mounts["tls"]["mountPath"] == "/etc/hookrelay/tls", "the TLS secret is not where routes.yaml looks")
    (config_map,) = by_kind["ConfigMap"]
    storage = yaml.safe_load(config_map["data"]["routes.yaml"]).get("storage", {})
    if shared:
        # Several pods, one database: no pod keeps anything of its own.
        check(storage.get("backend") == "postgres", "several pods need storage.backend: postgres")
        check("data" not in mounts, "a pod of the Deployment mounts a data volume")
        check(sts["spec"]["replicas"] >= 2, "fewer than two pods: no instance takes over")
        update = sts["spec"]["strategy"]["rollingUpdate"]
        check(update["maxUnavailable"] == 0, "a rolling update may leave fewer pods ready than replicas")
        check(any(b["spec"].get("maxUnavailable") == 1 for b in by_kind.get("PodDisruptionBudget", [])),
              "no PodDisruptionBudget keeps all but one pod up")
        generated = [s for s in by_kind.get("Secret", []) if "DATABASE_URL" in s.get("data", {})]
        check(generated, "no Secret holds DATABASE_URL, which routes.yaml reads")
    else:
        check(storage.get("backend", "sled") == "sled", "one pod with a volume is the sled layout")
        check(mounts["data"]["mountPath"] == env["HOOKRELAY_DATA"], "the data volume is not at the image's HOOKRELAY_DATA")
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        check("data" in claims, "the data volume is not a PersistentVolumeClaim")
        check(sts["spec"]["replicas"] == 1, "more than one replica: each would have a queue of its own")
    secret_refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    secrets = {s["metadata"]["name"] for s in by_kind.get("Secret", [])}
    check(secret_refs and secret_refs <= secrets, "the pod's secretRef names no Secret")

    if problems:
        sys.exit("\n".join(f"k8s: {p}" for p in problems))
    print(f"{len(docs)} objects agree with each other and with the image")


def image_env(dockerfile_path):
    """The ENV of the Dockerfile's last stage, as a dict."""
    text = open(dockerfile_path).read().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


if __name__ == "__main__":
    main(*sys.argv[1:])
