//! What flowguard says to the operator: sentences on stdout, errors on
//! stderr, written so that a closed pipe (`flowguard run | head`, a log
//! collector that restarted) drops the text instead of ending the daemon.
//! `println!` panics on EPIPE (Rust ignores SIGPIPE), which would detach
//! every program.

use std::{
    fmt,
    io::{self, Write as _},
};

/// Writes one line to stdout; a reader that went away loses the line, and
/// any other write error is reported on stderr.
pub fn line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let written = writeln!(out, "{args}").and_then(|()| out.flush());
    if let Err(e) = written {
        if e.kind() != io::ErrorKind::BrokenPipe {
            error_line(format_args!("flowguard: cannot write to stdout: {e}"));
        }
    }
}

/// Writes one line to stderr; nothing is left to tell if that fails too.
pub fn error_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

/// `println!` that survives a closed stdout.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

/// `eprintln!` that survives a closed stderr.
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::out::error_line(format_args!($($arg)*))
    };
}
