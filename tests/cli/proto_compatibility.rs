//! The contract checks of `proto/`: `buf lint` (STANDARD and COMMENTS: every
//! element documented) is clean, and `scripts/buf-breaking.sh` — what
//! scripts/test.sh runs against the merge base with main — fails on a
//! wire-incompatible change.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn buf_available() {
    let found = Command::new("buf")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        found,
        "buf must be installed (npm install --global @bufbuild/buf)"
    );
}

/// Copies `proto/` into `into`.
fn copy_protos(into: &Path) {
    let status = Command::new("cp")
        .arg("-r")
        .arg(root().join("proto"))
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn buf_lint_with_the_comments_rules_is_clean() {
    buf_available();
    let config = std::fs::read_to_string(root().join("proto/buf.yaml")).unwrap();
    assert!(
        config.contains("- COMMENTS"),
        "proto/buf.yaml lints COMMENTS"
    );
    let output = Command::new("buf")
        .arg("lint")
        .current_dir(root().join("proto"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "buf lint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn buf_breaking_fails_on_a_renumbered_field() {
    buf_available();
    let dir = tempfile::tempdir().unwrap();
    let (base, changed) = (dir.path().join("base"), dir.path().join("changed"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&changed).unwrap();
    copy_protos(&base);
    copy_protos(&changed);
    let file = changed.join("proto/billing/v1/balances.proto");
    let text = std::fs::read_to_string(&file).unwrap();
    // DebitRequest.amount moves from field 2 to 20: old clients' amounts are lost.
    let renumbered = text.replacen(
        "  // Positive decimal string, up to 6 fractional digits (e.g. \"0.0035\").\n  string amount = 2;",
        "  // Positive decimal string, up to 6 fractional digits (e.g. \"0.0035\").\n  string amount = 20;",
        1,
    );
    assert_ne!(renumbered, text, "the field to renumber was not found");
    std::fs::write(&file, renumbered).unwrap();

    let script = root().join("scripts/buf-breaking.sh");
    let run = |proto: &Path| {
        Command::new(&script)
            .arg(proto)
            .arg(base.join("proto"))
            .output()
            .unwrap()
    };
    let unchanged = run(&base.join("proto"));
    assert!(
        unchanged.status.success(),
        "the same protos must pass: {}",
        String::from_utf8_lossy(&unchanged.stdout)
    );
    let broken = run(&changed.join("proto"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&broken.stdout),
        String::from_utf8_lossy(&broken.stderr)
    );
    assert!(
        !broken.status.success(),
        "a renumbered field passed: {report}"
    );
    assert!(
        report.contains("\"amount\"") && report.contains("DebitRequest"),
        "{report}"
    );
}

#[test]
fn buf_breaking_without_a_main_branch_says_what_it_skipped() {
    buf_available();
    let dir = tempfile::tempdir().unwrap();
    // A copy of the script and protos outside any git history.
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    std::fs::copy(
        root().join("scripts/buf-breaking.sh"),
        dir.path().join("scripts/buf-breaking.sh"),
    )
    .unwrap();
    copy_protos(dir.path());
    let output = Command::new("bash")
        .arg(dir.path().join("scripts/buf-breaking.sh"))
        .env("GIT_CEILING_DIRECTORIES", dir.path().parent().unwrap())
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("SKIPPED"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
