"""The consortium project file provisions with NVFlare's own tool, and the site-policy tool edits
a provisioned kit into one that NVFlare reads: package allow-listed, custom code refused."""

import json
import subprocess
import sys

import pytest

from conftest import NVFLARE, REPO

PROJECT = REPO / "jobs" / "consortium" / "project.yml"
SITES = ("hospital-a", "hospital-b", "hospital-c")

pytestmark = pytest.mark.integration  # `nvflare provision` of a whole project


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    out = tmp_path_factory.mktemp("provision")
    res = subprocess.run([NVFLARE, "provision", "-p", str(PROJECT), "-w", str(out)], capture_output=True, text=True,
                         cwd=out, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out / "fedharmony" / "prod_00"


def test_the_project_provisions_a_server_named_sites_and_admins_with_their_roles(kits):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    for site in SITES:
        fed_client = json.loads((kits / site / "startup" / "fed_client.json").read_text())
        assert fed_client["servers"][0]["service"]["target"] == "fl-server.example.org:8002"
        cert = x509.load_pem_x509_certificate((kits / site / "startup" / "client.crt").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site  # the site's identity
        assert (kits / site / "startup" / "start.sh").is_file()
    assert (kits / "fl-server.example.org" / "startup" / "fed_server.json").is_file()
    for admin in ("admin@coordinating-centre.example.org", "researcher@hospital-a.example.org",
                  "it@hospital-b.example.org"):
        assert (kits / admin / "startup" / "fed_admin.json").is_file()


def test_site_policy_tool_makes_a_kit_run_fedharmony_without_custom_code(kits):
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    kit = kits / "hospital-a"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "site_policy.py"), str(kit), "--allow-package",
                          "--forbid-custom-code"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    resources = json.loads((kit / "local" / "resources.json").read_text())
    allow = ComponentPathAuthorizer._normalize_allow_list(resources["class_allow_list"])  # NVFlare's own parsing

    def admitted(path):  # NVFlare's own matching of a component path against the list
        return any(ComponentPathAuthorizer._path_matches_prefix(path, entry) for entry in allow)

    assert admitted("fedharmony.fl.executor.BundleExecutor") and admitted("nvflare.app_common.workflows.fedavg.FedAvg")
    # exact classes, not the package: helpers importable under it (which parse a job's configs) are not components
    assert not admitted("fedharmony.fl.executor.BundleSite") and not admitted("fedharmony.fl.persistor.build_network")
    assert not admitted("fedharmony.fl.persistor.BundleModelPersistor")  # a server component, not a site's
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert resources["components"]  # the kit's own components are kept
    policy = json.loads((kit / "local" / "authorization.json").read_text())["permissions"]
    assert all(policy[role]["byoc"] == "none" for role in ("project_admin", "org_admin", "lead", "member"))
    assert policy["lead"]["submit_job"] == "any"  # nothing else changed
    # idempotent, and a package-prefix entry of an older version of the tool is replaced
    resources["class_allow_list"].append("fedharmony.fl.")
    (kit / "local" / "resources.json").write_text(json.dumps(resources))
    subprocess.run([sys.executable, str(REPO / "tools" / "site_policy.py"), str(kit), "--allow-package"], check=True,
                   capture_output=True)
    again = json.loads((kit / "local" / "resources.json").read_text())["class_allow_list"]
    assert again.count("fedharmony.fl.executor.BundleExecutor") == 1 and "fedharmony.fl." not in again


def test_site_policy_tool_refuses_a_folder_that_is_not_a_kit(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tools" / "site_policy.py"), str(tmp_path), "--allow-package"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "is not a provisioned startup kit" in res.stderr
