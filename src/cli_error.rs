//! Errors a user sees: one line that says what went wrong, a hint that
//! says what to do, and a stable code for scripts (`--json`).

use std::fmt;

/// A failure with a stable machine-readable code.
#[derive(Debug)]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(code: &'static str, message: impl Into<String>) -> CliError {
        CliError { code, message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> CliError {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for CliError {}

/// Finds the [`CliError`] in an error chain, or wraps the chain as an
/// internal error with its full context.
pub fn classify(error: &anyhow::Error) -> CliError {
    if let Some(cli) = error.downcast_ref::<CliError>() {
        return CliError { code: cli.code, message: cli.message.clone(), hint: cli.hint.clone() };
    }
    let message = format!("{error:#}");
    CliError::new("internal", message)
}
