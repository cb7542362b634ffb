//! `gantry` in a shell: a pipe whose reader stops early (`gantry jobs | head -1`), and the
//! completion scripts of `gantry completion SHELL`.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::{Fleet, GANTRY};

/// What `gantry` exits with when its stdout's reader has gone: 128 + SIGPIPE, as a shell
/// reports for a Unix tool that SIGPIPE ended.
const STDOUT_CLOSED_EXIT: i32 = 141;

/// Runs `gantry args` with a stdout pipe whose read end is already closed, so that its first
/// write fails with EPIPE (a reader that stopped early, without the race of a real `head`).
fn with_stdout_closed(args: &[&str], coordinator: Option<&Fleet>) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(GANTRY);
    cmd.args(args).stdin(Stdio::null()).stdout(writer).stderr(Stdio::piped());
    if let Some(fleet) = coordinator {
        cmd.env("GANTRY_COORDINATOR", fleet.url()).env("GANTRY_TOKEN", &fleet.admin_token).env("GANTRY_CA", fleet.ca());
    }
    cmd.output().unwrap()
}

fn assert_ends_quietly(args: &[&str], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "gantry {args:?}: {stderr}");
    assert!(stderr.is_empty(), "gantry {args:?} should end without a message: {stderr}");
    assert_eq!(out.status.code(), Some(STDOUT_CLOSED_EXIT), "gantry {args:?}: {:?}", out.status);
}

#[test]
fn a_closed_stdout_ends_offline_commands_quietly_with_status_141() {
    let commands: [&[&str]; 3] =
        [&["completion", "bash"], &["sim", "--generate", "20"], &["sim", "--generate", "20", "-o", "json"]];
    for args in commands {
        assert_ends_quietly(args, &with_stdout_closed(args, None));
    }
}

/// The bug: `gantry checkpoints ID -o json | grep -q sha256` panicked ("failed printing to
/// stdout: Broken pipe") and exited 101. Every output path: tables, JSON, text and logs.
#[test]
fn a_closed_stdout_ends_client_commands_quietly_instead_of_panicking() {
    let fleet = Fleet::start();
    let id = fleet.submit("name: hello\ncommand: [\"echo\", \"hello\"]\n");
    fleet.wait_state(&id, &["succeeded"], Duration::from_secs(60));
    assert!(fleet.ok(&["logs", &id]).contains("hello"));
    for args in [
        &["checkpoints", &id, "-o", "json"][..],
        &["checkpoints", &id],
        &["jobs"],
        &["jobs", "-o", "json"],
        &["job", &id],
        &["logs", &id],
        &["logs", "-f", &id],
        &["logs", &id, "-o", "json"],
        &["nodes"],
        &["gpus", "-o", "json"],
    ] {
        assert_ends_quietly(args, &with_stdout_closed(args, Some(&fleet)));
    }
}

fn completion(shell: &str) -> String {
    let out = Command::new(GANTRY).args(["completion", shell]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn installed(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn completions_for_bash_zsh_and_fish_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let script = completion(shell);
        for word in ["submit", "checkpoints", "drain", "completion"] {
            assert!(script.contains(word), "{shell} completion lacks `{word}`:\n{script}");
        }
    }
}

#[test]
fn the_bash_completion_loads_in_bash() {
    if !installed("bash") {
        eprintln!("bash is not installed: not loading the completion");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gantry.bash");
    std::fs::write(&file, completion("bash")).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"set -e; source "$1"; complete -p gantry"#)
        .arg("bash")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "sourcing the completion failed: {stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("gantry"), "no completion registered for gantry");
}
