"""The cluster files are linted and validated in the suite: shellcheck on every shell script under
launch/, hadolint on the Dockerfile, the MPIJob against the MPI Operator's v2beta1 schema
(launch/k8s/schema) and its pod templates and the PVC against the core Kubernetes schemas, and the
MPIJob's arithmetic (-np == slotsPerWorker x workers) and shared, resumable run directory."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.multirank import BIN, ROOT

K8S = ROOT / "launch" / "k8s"
SCHEMA = K8S / "schema" / "mpijob-v2beta1.schema.json"
TOOLS_HINT = "run `bash launch/install.sh --test-tools`"


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert path, f"{name} is missing: {TOOLS_HINT}"
    return str(path)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=str(ROOT))


def shell_scripts() -> list[Path]:
    found = []
    for path in sorted((ROOT / "launch").rglob("*")):
        if path.is_file() and (path.suffix in (".sh", ".sbatch") or path.read_bytes()[:2] == b"#!"):
            found.append(path)
    return found


def test_shellcheck_every_launch_script() -> None:
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {"install.sh", "apt.sh", "test-tools.sh", "slurm.sbatch"}
    r = run([tool("shellcheck"), "-x", *map(str, scripts)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_dockerfile() -> None:
    r = run([tool("hadolint"), "Dockerfile"])
    assert r.returncode == 0, r.stdout + r.stderr


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def check_mpijob(doc: dict, tmp: Path) -> subprocess.CompletedProcess:
    f = tmp / "mpijob.yaml"
    f.write_text(yaml.safe_dump(doc))
    return run([tool("check-jsonschema"), "--schemafile", str(SCHEMA), str(f)])


def test_mpijob_matches_the_crd_schema_and_pods_the_core_schemas(tmp_path: Path) -> None:
    (job,) = load("mpijob.yaml")
    r = check_mpijob(job, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for path, value in ((("spec", "mpiImplementation"), "OpenMPl"), (("spec", "slotPerWorker"), 1),
                        (("spec", "mpiReplicaSpecs", "Launcher", "restartPolicy"), "Sometimes")):
        bad = copy.deepcopy(job)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert check_mpijob(bad, tmp_path).returncode != 0, path      # the schema does reject mistakes
    # each pod template as a core v1 PodTemplate, and the claim, against Kubernetes' own schemas
    docs = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"hvdllm-{role.lower()}"},
             "template": spec["template"]} for role, spec in job["spec"]["mpiReplicaSpecs"].items()]
    pods = tmp_path / "pods.yaml"
    pods.write_text(yaml.safe_dump_all(docs))
    r = run([tool("kubernetes-validate"), "--strict", str(pods), str(K8S / "pvc.yaml")])
    assert r.returncode == 0, r.stdout + r.stderr
    pods.write_text(yaml.safe_dump_all([{**docs[0], "template": {"spec": {"containers": [{"name": "x", "imag": "y"}]}}}]))
    assert run([tool("kubernetes-validate"), "--strict", str(pods)]).returncode != 0


def test_mpijob_ranks_and_shared_resumable_run_directory() -> None:
    (job,) = load("mpijob.yaml")
    (pvc,) = load("pvc.yaml")
    spec = job["spec"]
    launcher, worker = spec["mpiReplicaSpecs"]["Launcher"], spec["mpiReplicaSpecs"]["Worker"]
    cmd = launcher["template"]["spec"]["containers"][0]["command"]
    np_ = int(cmd[cmd.index("-np") + 1])
    assert np_ == spec.get("slotsPerWorker", 1) * worker["replicas"], (np_, spec.get("slotsPerWorker"), worker["replicas"])
    assert launcher["replicas"] == 1 and launcher["restartPolicy"] in ("OnFailure", "ExitCode")
    assert "--resume" in cmd       # a restarted launcher continues from the newest checkpoint
    out = cmd[cmd.index("--out") + 1]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for role in (launcher, worker):
        pod = role["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
        assert any(out.startswith(m["mountPath"].rstrip("/") + "/") and claims.get(m["name"]) == pvc["metadata"]["name"]
                   for m in mounts), (out, mounts, claims)
    user = launcher["template"]["spec"]["securityContext"]["runAsUser"]
    assert user != 0 and spec["sshAuthMountPath"] == "/home/hvdllm/.ssh"
