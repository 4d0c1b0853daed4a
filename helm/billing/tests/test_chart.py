#!/usr/bin/env python3
"""Lints and renders the chart with Helm's own library (PyPI helm-python-sdk,
no helm binary) and checks the rendered manifests: probes, securityContext,
hook annotations, secrets by reference, and values a user sets. Then feeds
the rendered ConfigMap + env (secrets faked, secret volumes materialised) to
the real binary's `billing serve --check`, for default and production-like
values: a chart whose pods cannot start fails here.

Run: python3 helm/billing/tests/test_chart.py   (pip install helm-python-sdk pyyaml)
The binary: $BILLING_BIN, else built with `cargo build --bin billing`.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import unittest

import helm_python
import yaml
from helm_python import Chart

CHART = pathlib.Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
FIXTURES = REPO / "tests" / "fixtures"

# What the cluster's Secrets would hold, by the variable they are passed as.
FAKE_SECRETS = {
    "DATABASE_URL": "postgres://billing:S3cret-pw@db.example.internal:5432/billing?sslmode=verify-full",
    "BILLING_JWT_SECRET": "an-hs256-secret-of-at-least-32-bytes-0123456789",
    "BILLING_SMTP_PASSWORD": "smtp-S3cret",
    "BILLING_SMTP_USERNAME": "billing-mailer",
    "BILLING_STRIPE_SECRET_KEY": "sk_test_51FakeKeyForTheChartTest",
    "BILLING_STRIPE_WEBHOOK_SECRET": "whsec_FakeWebhookSecretForTheChartTest",
}

# Production-like values: Stripe, SMTP, a managed Postgres with its CA, an
# RS256 public key, a separate migration role, traces on.
PRODUCTION = {
    "replicaCount": 3,
    "autoscaling": {"enabled": False},
    "image": {"repository": "registry.example/billing", "tag": "1.0.0"},
    "config": {
        "smtpHost": "smtp.example.com",
        "smtpPort": 465,
        "smtpSecurity": "tls",
        "mailFrom": "Billing <billing@example.com>",
        "databaseSslMode": "verify-full",
        "maxMessageBytes": 4194304,
        "concurrencyLimit": 1024,
        "jwtIssuer": "https://auth.example.com",
    },
    "gateway": {
        "kind": "stripe",
        "stripe": {
            "secretKey": {"existingSecret": "stripe", "key": "secret-key"},
            "webhookSecret": {"existingSecret": "stripe", "key": "webhook-secret"},
            "returnUrl": "https://panel.example.com/cards/return",
        },
    },
    "secrets": {
        "database": {"existingSecret": "pg-runtime", "key": "url"},
        "migrationDatabase": {"existingSecret": "pg-owner", "key": "url"},
        "databaseCa": {"existingSecret": "pg-ca", "key": "ca.crt"},
        "jwt": {"existingSecret": "jwt", "publicKeyKey": "public.pem"},
        "smtp": {"existingSecret": "smtp", "key": "password", "usernameKey": "username"},
    },
    "otel": {"endpoint": "http://otel-collector.observability:4317"},
    "metrics": {"serviceMonitor": {"enabled": True}},
}

_BINARY = None


def billing_binary():
    """$BILLING_BIN, else the debug binary cargo builds (and reports) now."""
    global _BINARY
    if _BINARY:
        return _BINARY
    if os.environ.get("BILLING_BIN"):
        _BINARY = os.environ["BILLING_BIN"]
        return _BINARY
    built = subprocess.run(
        ["cargo", "build", "--bin", "billing", "--message-format=json-render-diagnostics"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=3600, check=True,
    )
    for line in built.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "billing":
            _BINARY = message["executable"]
    assert _BINARY, "cargo built no billing executable"
    return _BINARY


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


def secret_file_content(path):
    """Plausible content of a mounted Secret's item."""
    if path.endswith(".pem"):
        return (FIXTURES / "rs256-public.pem").read_text()
    return "-----BEGIN CERTIFICATE-----\nMIIB (a CA certificate)\n-----END CERTIFICATE-----\n"


def container_environment(documents, kind, scratch):
    """The environment the container of `kind` starts with: its ConfigMap
    (envFrom), its env with secretKeyRefs resolved to fake values, and its
    Secret volumes written under `scratch` (paths in values rewritten)."""
    pod = one(documents, kind)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config_map = one(documents, "ConfigMap")
        assert config_map["metadata"]["name"] == name, name
        env.update(config_map["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        else:
            assert "secretKeyRef" in variable["valueFrom"], variable
            env[variable["name"]] = FAKE_SECRETS[variable["name"]]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" not in volume:
            continue
        local = pathlib.Path(scratch) / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        for item in volume["secret"]["items"]:
            (local / item["path"]).write_text(secret_file_content(item["path"]))
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/"):
                env[name] = str(local) + value[len(mount["mountPath"]):]
    for name, value in env.items():
        assert isinstance(value, str), (name, value)
    return container, env


def run_check(documents, kind="Deployment"):
    """`billing <args> --check` with exactly the container's environment."""
    with tempfile.TemporaryDirectory() as scratch:
        container, env = container_environment(documents, kind, scratch)
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        return subprocess.run(
            [billing_binary(), *container["args"], "--check"],
            env=env, capture_output=True, text=True, timeout=60,
        )


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

    def test_liveness_asks_the_liveness_service_and_readiness_the_overall_status(self):
        container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        self.assertEqual(container["livenessProbe"]["grpc"], {"port": 50051, "service": "liveness"})
        self.assertEqual(container["readinessProbe"]["grpc"], {"port": 50051, "service": ""})

    def test_billing_serve_check_accepts_the_default_render(self):
        result = run_check(render())
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("configuration OK", result.stdout)

    def test_billing_serve_check_accepts_a_production_like_render(self):
        result = run_check(render(PRODUCTION))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("gateway: stripe (test mode), webhook on 0.0.0.0:8080", result.stdout)
        self.assertIn("sslmode=verifyfull", result.stdout.replace("-", ""))
        self.assertNotIn(FAKE_SECRETS["DATABASE_URL"].split(":")[2].split("@")[0], result.stdout)

    def test_billing_serve_check_fails_on_a_value_the_binary_refuses(self):
        # The check can fail: a setting the binary refuses is caught here, not in a crash loop.
        result = run_check(render({"config": {"extraEnv": {"BILLING_MAX_MESSAGE_BYTES": "1.048576e+06"}}}))
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("max-message-bytes", result.stderr)

    def test_numbers_render_as_integers(self):
        for values in ({}, PRODUCTION):
            data = one(render(values), "ConfigMap")["data"]
            for name, value in data.items():
                self.assertNotRegex(value, r"^[0-9.]+e[+-][0-9]+$", f"{name}={value}")
            self.assertEqual(data["BILLING_MAX_MESSAGE_BYTES"], str(values.get("config", {}).get("maxMessageBytes", 1048576)))

    def test_the_values_schema_refuses_a_wrong_type(self):
        with self.assertRaises(Exception) as refused:
            render({"config": {"maxMessageBytes": "a lot"}})
        self.assertIn("maxMessageBytes", str(refused.exception))
        with self.assertRaises(Exception):
            render({"gateway": {"kind": "paypal"}})

    def test_a_chart_with_no_jwt_verification_key_is_refused(self):
        # Each pod would otherwise make a development key of its own.
        with self.assertRaises(Exception) as refused:
            render({"secrets": {"jwt": {"existingSecret": "", "publicKeyKey": ""}}})
        self.assertIn("JWT verification key is required", str(refused.exception))
        with self.assertRaises(Exception) as refused:
            render({"secrets": {"jwt": {"existingSecret": "", "publicKeyKey": "", "hs256SecretKey": "hs"}}})
        self.assertIn("secrets.jwt.existingSecret is required", str(refused.exception))
        # An identity provider's keys are enough.
        render({"config": {"jwtJwksUrl": "https://sso.example.com/jwks.json"},
                "secrets": {"jwt": {"existingSecret": "", "publicKeyKey": ""}}})

    def test_replicas_leave_migrations_to_the_job_and_its_own_role(self):
        documents = render(PRODUCTION)
        self.assertEqual(one(documents, "ConfigMap")["data"]["BILLING_MIGRATE"], "false")
        job_env = {
            e["name"]: e
            for e in one(documents, "Job")["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        self.assertEqual(
            job_env["DATABASE_URL"]["valueFrom"]["secretKeyRef"], {"name": "pg-owner", "key": "url"}
        )
        self.assertEqual(job_env["PGSSLROOTCERT"]["value"], "/etc/billing/postgres-ca/ca.crt")
        without_job = one(render({"migration": {"enabled": False}}), "ConfigMap")["data"]
        self.assertEqual(without_job["BILLING_MIGRATE"], "true")

    def test_migration_job_pods_are_not_selected_by_the_service_pdb_or_deployment(self):
        documents = render()
        job_labels = one(documents, "Job")["spec"]["template"]["metadata"]["labels"]
        selectors = [
            one(documents, "Service")["spec"]["selector"],
            one(documents, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
            one(documents, "Deployment")["spec"]["selector"]["matchLabels"],
        ]
        for selector in selectors:
            matched = all(job_labels.get(k) == v for k, v in selector.items())
            self.assertFalse(matched, f"{selector} selects the migration pods {job_labels}")
        pod_labels = one(documents, "Deployment")["spec"]["template"]["metadata"]["labels"]
        for selector in selectors:
            self.assertTrue(all(pod_labels.get(k) == v for k, v in selector.items()), selector)

    def test_stripe_secrets_are_referenced_and_the_webhook_has_its_own_port(self):
        documents = render(PRODUCTION)
        container = one(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        self.assertEqual(
            env["BILLING_STRIPE_SECRET_KEY"]["valueFrom"]["secretKeyRef"],
            {"name": "stripe", "key": "secret-key"},
        )
        self.assertEqual(
            env["BILLING_STRIPE_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"],
            {"name": "stripe", "key": "webhook-secret"},
        )
        config = one(documents, "ConfigMap")["data"]
        self.assertEqual(config["BILLING_GATEWAY"], "stripe")
        self.assertFalse(any(v.startswith(("sk_", "whsec_")) for v in config.values()))
        ports = {p["name"]: p for p in container["ports"]}
        self.assertEqual(ports["webhook"]["containerPort"], 8080)
        self.assertEqual(config["BILLING_WEBHOOK_LISTEN"], "0.0.0.0:8080")
        service_ports = {p["name"]: p for p in one(documents, "Service")["spec"]["ports"]}
        self.assertEqual(service_ports["webhook"]["targetPort"], "webhook")
        self.assertNotEqual(service_ports["webhook"]["port"], service_ports["metrics"]["port"])
        self.assertNotIn("webhook", {p["name"] for p in one(render(), "Service")["spec"]["ports"]})

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
        mount = next(m for m in mounts if data_dir == m or data_dir.startswith(m + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[mount])
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

    def test_an_identity_provider_and_a_directory_of_public_keys_reach_the_pods(self):
        documents = render({
            "config": {
                "jwtIssuer": "https://sso.example.com/realms/billing",
                "jwtAudience": "billing",
                "jwtOidcDiscovery": True,
                "jwtRolesClaim": "realm_access.roles",
                "jwtRoleMap": "billing-admin=admin,svc=service",
                "jwtAccountClaim": "billing_account",
            },
            "secrets": {"jwt": {"existingSecret": "jwt-keys", "publicKeyKey": "*"}},
        })
        config = one(documents, "ConfigMap")["data"]
        self.assertEqual(config["BILLING_JWT_OIDC_DISCOVERY"], "true")
        self.assertEqual(config["BILLING_JWT_ROLES_CLAIM"], "realm_access.roles")
        self.assertEqual(config["BILLING_JWT_ROLE_MAP"], "billing-admin=admin,svc=service")
        self.assertEqual(config["BILLING_JWT_ACCOUNT_CLAIM"], "billing_account")
        self.assertNotIn("BILLING_JWT_JWKS_URL", config)
        pod = one(documents, "Deployment")["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        # Every key of the Secret is mounted: a rotation adds one, billing re-reads the folder.
        self.assertEqual(env["BILLING_JWT_PUBLIC_KEY_FILE"]["value"], "/etc/billing/jwt")
        volume = next(v for v in pod["volumes"] if v["name"] == "jwt")
        self.assertEqual(volume["secret"]["secretName"], "jwt-keys")
        self.assertNotIn("items", volume["secret"])

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
