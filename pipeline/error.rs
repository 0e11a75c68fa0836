//! Problems with the input, and the errors that end a command.
//!
//! A [`Problem`] is one thing wrong with what the user gave us, located as
//! precisely as we can (file, line, column, device). Ingest and lint collect
//! every problem before stopping, so a factory fixes its export once, not once
//! per error.

use std::fmt;

/// Where a problem is, and what is wrong there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub file: Option<String>,
    pub line: Option<u64>,
    /// 1-based column of a JSON error, when the input is JSON.
    pub column_number: Option<u64>,
    /// The CSV column (header name) the problem is in.
    pub column: Option<String>,
    pub device: Option<String>,
    pub message: String,
}

impl Problem {
    pub fn new(message: impl Into<String>) -> Self {
        Problem {
            file: None,
            line: None,
            column_number: None,
            column: None,
            device: None,
            message: message.into(),
        }
    }
    pub fn file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }
    pub fn line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }
    pub fn column_number(mut self, column: u64) -> Self {
        self.column_number = Some(column);
        self
    }
    pub fn column(mut self, column: impl Into<String>) -> Self {
        self.column = Some(column.into());
        self
    }
    pub fn device(mut self, device: impl Into<String>) -> Self {
        self.device = Some(device.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wrote = false;
        if let Some(file) = &self.file {
            write!(f, "{file}")?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
                if let Some(col) = self.column_number {
                    write!(f, ":{col}")?;
                }
            }
            wrote = true;
        } else if let Some(line) = self.line {
            write!(f, "line {line}")?;
            wrote = true;
        }
        if let Some(column) = &self.column {
            write!(f, "{}column `{column}`", if wrote { ", " } else { "" })?;
            wrote = true;
        }
        if let Some(device) = &self.device {
            write!(f, "{}device `{device}`", if wrote { ", " } else { "" })?;
            wrote = true;
        }
        if wrote {
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in one pass over the input.
#[derive(Clone, Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, p: Problem) {
        self.0.push(p);
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn extend(&mut self, other: Problems) {
        self.0.extend(other.0);
    }
    /// `Ok(())` when nothing was found, else the whole list as an input error.
    pub fn into_result(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::Input(self))
        }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Exit codes, as documented in the README and `--help`.
pub mod exit {
    /// Every device provisioned and bundled.
    pub const OK: i32 = 0;
    /// Finished, but some devices failed; their rows in results.csv say why.
    pub const PARTIAL: i32 = 1;
    /// Input, configuration or usage rejected; nothing was sent.
    pub const REJECTED: i32 = 2;
    /// Stopped by an infrastructure error; the batch's state is kept for `resume`.
    pub const INFRA: i32 = 3;
}

/// What ends a command early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input has problems; nothing was generated or sent for it.
    #[error("the input was rejected ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0)]
    Input(Problems),
    /// Options or configuration that cannot work; nothing was sent.
    #[error("{0}")]
    Config(String),
    /// AWS (or the sandbox) could not be reached or refused in a way that is
    /// not the input's fault. The ledger keeps what was done.
    #[error("{0}")]
    Infra(String),
    /// Anything else, with its chain of causes.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Config(_) => exit::REJECTED,
            Error::Infra(_) | Error::Other(_) => exit::INFRA,
        }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    pub fn infra(msg: impl Into<String>) -> Self {
        Error::Infra(msg.into())
    }
}

impl From<Problem> for Error {
    fn from(p: Problem) -> Self {
        Error::Input(Problems(vec![p]))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
