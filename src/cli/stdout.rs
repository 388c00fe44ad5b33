//! The commands' results on stdout. A write that fails (a full disk, a reader that went away)
//! is an error that names stdout, never the panic that `println!` gives; a closed pipe is
//! then left quiet by `main`.

use anyhow::{Context, Result};
use std::fmt::Display;
use std::io::{BufWriter, StdoutLock, Write};

const WHAT: &str = "writing the results to stdout";

/// Whether `err` is a write to a reader that went away (`| head`): what it wanted it has.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `result` with a reader that went away taken as no error: for a command whose exit status
/// is its verdict (`selftest`, `plan`), which must not turn into success because nobody
/// read the table.
pub fn unless_unread(result: Result<()>) -> Result<()> {
    match result {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

/// `text` and a newline on stdout, flushed.
pub fn line(text: impl Display) -> Result<()> {
    let mut out = Lines::new();
    out.line(text)?;
    out.finish()
}

/// `text` as it is (its own newlines) on stdout, flushed.
pub fn text(text: impl Display) -> Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "{text}")
        .and_then(|()| out.flush())
        .context(WHAT)
}

/// Lines written to stdout through one buffer, for a command that prints many.
pub struct Lines {
    out: BufWriter<StdoutLock<'static>>,
}

impl Lines {
    pub fn new() -> Self {
        Lines {
            out: BufWriter::new(std::io::stdout().lock()),
        }
    }

    pub fn line(&mut self, text: impl Display) -> Result<()> {
        writeln!(self.out, "{text}").context(WHAT)
    }

    /// Flushes what is buffered: a failure here is the last line's.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush().context(WHAT)
    }
}
