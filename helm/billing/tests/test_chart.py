#!/usr/bin/env python3
"""Lints and renders the chart with Helm's own library (PyPI helm-python-sdk,
no helm binary) and checks the rendered manifests: probes, securityContext,
hook annotations, secrets by reference, and values a user sets.

Run: python3 helm/billing/tests/test_chart.py   (pip install helm-python-sdk pyyaml)
"""

import pathlib
import sys
import unittest

import helm_python
import yaml
from helm_python import Chart

CHART = pathlib.Path(__file__).resolve().parent.parent


def render(values=None, is_upgrade=False):
    chart = Chart.load(str(CHART))
    try:
        rendered = chart.render(
            values or {},
            name="prod",
            namespace="billing",
            is_install=not is_upgrade,
            is_upgrade=is_upgrade,
        )
    finally:
        chart.close()
    documents = {}
    for path, text in rendered.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                documents[(document["kind"], path)] = document
    return documents


def one(documents, kind):
    found = [d for (k, _), d in documents.items() if k == kind]
    assert len(found) == 1, f"{kind}: {len(found)} rendered"
    return found[0]


def kinds(documents):
    return {kind for kind, _ in documents}


class ChartTest(unittest.TestCase):
    def test_lint_is_clean_in_strict_mode(self):
        report = helm_python.lint(str(CHART), strict=True, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        self.assertEqual(report["errors"], [], report)
        self.assertEqual(problems, [], report)

    def test_default_render_has_every_part(self):
        documents = render()
        self.assertLessEqual(
            {"Deployment", "Service", "ConfigMap", "Job", "HorizontalPodAutoscaler",
             "PodDisruptionBudget", "ServiceAccount"},
            kinds(documents),
        )
        self.assertNotIn("ServiceMonitor", kinds(documents))

    def test_probes_are_native_grpc_against_tonic_health(self):
        container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["livenessProbe"]["grpc"], {"port": 50051, "service": ""})
        self.assertEqual(
            container["readinessProbe"]["grpc"],
            {"port": 50051, "service": "billing.v1.Balances"},
        )

    def test_pods_run_restricted(self):
        documents = render()
        for kind in ("Deployment", "Job"):
            pod = one(documents, kind)["spec"]["template"]["spec"]
            self.assertTrue(pod["securityContext"]["runAsNonRoot"])
            self.assertEqual(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault")
            for container in pod["containers"]:
                security = container["securityContext"]
                self.assertFalse(security["allowPrivilegeEscalation"], kind)
                self.assertTrue(security["readOnlyRootFilesystem"], kind)
                self.assertTrue(security["runAsNonRoot"], kind)
                self.assertEqual(security["capabilities"]["drop"], ["ALL"], kind)

    def test_the_data_dir_is_a_writable_volume(self):
        documents = render()
        pod = one(documents, "Deployment")["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        data_dir = one(documents, "ConfigMap")["data"]["BILLING_DATA_DIR"]
        self.assertIn(data_dir, mounts)
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[data_dir])
        self.assertIn("emptyDir", volume)

    def test_the_migration_job_is_a_pre_install_and_pre_upgrade_hook(self):
        for is_upgrade in (False, True):
            job = one(render(is_upgrade=is_upgrade), "Job")
            annotations = job["metadata"]["annotations"]
            self.assertEqual(annotations["helm.sh/hook"], "pre-install,pre-upgrade")
            self.assertEqual(job["spec"]["template"]["spec"]["containers"][0]["args"], ["migrate"])

    def test_the_service_speaks_grpc_and_exposes_metrics(self):
        ports = {p["name"]: p for p in one(render(), "Service")["spec"]["ports"]}
        self.assertEqual(ports["grpc"]["appProtocol"], "grpc")
        self.assertEqual(ports["grpc"]["port"], 50051)
        self.assertEqual(ports["metrics"]["port"], 9090)

    def test_secrets_are_referenced_never_inlined(self):
        documents = render({
            "secrets": {
                "database": {"existingSecret": "pg", "key": "dsn"},
                "jwt": {"existingSecret": "keys", "publicKeyKey": "", "hs256SecretKey": "hs"},
                "smtp": {"existingSecret": "mail", "key": "pw"},
            }
        })
        self.assertNotIn("Secret", kinds(documents))
        env = {
            e["name"]: e
            for e in one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        self.assertEqual(env["DATABASE_URL"]["valueFrom"]["secretKeyRef"], {"name": "pg", "key": "dsn"})
        self.assertEqual(env["BILLING_JWT_SECRET"]["valueFrom"]["secretKeyRef"], {"name": "keys", "key": "hs"})
        self.assertEqual(env["BILLING_SMTP_PASSWORD"]["valueFrom"]["secretKeyRef"], {"name": "mail", "key": "pw"})

    def test_values_a_user_sets_reach_the_manifests(self):
        documents = render({
            "replicaCount": 4,
            "autoscaling": {"enabled": False},
            "image": {"repository": "registry.example/billing", "tag": "1.2.3"},
            "otel": {"endpoint": "http://collector:4317", "serviceName": "billing-eu"},
            "config": {"concurrencyLimit": 64, "smtpHost": "smtp.example"},
            "metrics": {"serviceMonitor": {"enabled": True}},
        })
        deployment = one(documents, "Deployment")
        self.assertEqual(deployment["spec"]["replicas"], 4)
        self.assertNotIn("HorizontalPodAutoscaler", kinds(documents))
        self.assertEqual(
            deployment["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.example/billing:1.2.3",
        )
        config = one(documents, "ConfigMap")["data"]
        self.assertEqual(config["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://collector:4317")
        self.assertEqual(config["OTEL_SERVICE_NAME"], "billing-eu")
        self.assertEqual(config["BILLING_CONCURRENCY_LIMIT"], "64")
        self.assertEqual(config["BILLING_SMTP_HOST"], "smtp.example")
        self.assertEqual(config["BILLING_LOG_FORMAT"], "json")
        self.assertEqual(config["BILLING_LISTEN"], "0.0.0.0:50051")
        self.assertEqual(one(documents, "ServiceMonitor")["spec"]["endpoints"][0]["path"], "/metrics")

    def test_traces_are_off_without_an_endpoint(self):
        self.assertNotIn("OTEL_EXPORTER_OTLP_ENDPOINT", one(render(), "ConfigMap")["data"])


if __name__ == "__main__":
    sys.exit(unittest.main())
