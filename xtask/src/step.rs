//! Running external commands as named steps: print the step, run it with the
//! terminal attached, and turn a failure into a sentence that names the step.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The workspace root: xtask lives one directory below it.
pub fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir
        .parent()
        .expect("the xtask crate sits inside the workspace")
        .to_path_buf()
}

/// Prints `==> what`, runs `command` with inherited stdio and fails unless it
/// exits successfully.
pub fn run(what: &str, command: &mut Command) -> Result<()> {
    run_or_explain(what, command, "see its output above")
}

/// Like `run`, with a failure message that ends in `hint`: what to do next.
pub fn run_or_explain(what: &str, command: &mut Command, hint: &str) -> Result<()> {
    println!("==> {what}");
    let status = status_of(command)?;
    if !status.success() {
        bail!(
            "`{}` failed ({}); {hint}.",
            display(command),
            describe(status)
        );
    }
    Ok(())
}

/// Runs `command` with inherited stdio and returns how it ended.
fn status_of(command: &mut Command) -> Result<ExitStatus> {
    command
        .status()
        .with_context(|| format!("could not start {}", display(command)))
}

/// Runs `command` quietly and returns its stdout, or `None` if it could not
/// start or exited unsuccessfully. For probes whose failure is an answer.
pub fn probe(command: &mut Command) -> Option<String> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether `program` can be found on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// "exit status 101" or "killed by signal 9".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The command line, for messages; the cargo running xtask shows as `cargo`.
pub fn display(command: &Command) -> String {
    let program = command.get_program();
    let program = if std::env::var_os("CARGO").is_some_and(|cargo| cargo == program) {
        "cargo".into()
    } else {
        program.to_string_lossy()
    };
    std::iter::once(program)
        .chain(command.get_args().map(|arg| arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}
