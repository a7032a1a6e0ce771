//! The Kubernetes manifests: `deploy/validate.sh` renders every kustomization with
//! `kubectl kustomize` and validates it strictly against the Kubernetes OpenAPI schemas
//! (offline, PyPI kubernetes-validate), then checks the least-privilege promises.
//! Needs `kubectl` and python3 (the venv is created on first use).

use std::process::Command;

use profiler_tests::workspace_root;

#[test]
fn manifests_render_and_validate() {
    let script = workspace_root().join("deploy/validate.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .expect("run deploy/validate.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "validate.sh failed:\n{stdout}\n{stderr}"
    );
    for target in [
        "deploy/overlays/production renders 9 objects",
        "deploy/overlays/legacy-kernel renders 6 objects",
        "deploy/base renders 6 objects",
        "deploy/collector renders 3 objects",
        "each added capability justified",
    ] {
        assert!(stdout.contains(target), "{target:?} missing:\n{stdout}");
    }
}
