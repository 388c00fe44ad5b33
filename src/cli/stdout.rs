//! The commands' results on stdout. A write that fails (a full disk, a reader that went away)
//! is an error that names stdout, never the panic that `println!` gives; a closed pipe is
//! then left quiet by `main`.

use anyhow::{Context, Result};
use std::fmt::Display;
use std::io::{BufWriter, StdoutLock, Write};

const WHAT: &str = "writing the results to stdout";

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
