//! Configuration: `wraith.toml` is read into a raw serde mirror (`raw`), then built into typed
//! values (`build`) with every problem reported at once, each with file, line, column and the
//! key path it concerns. Relative paths in the file are relative to the file's directory.

mod build;
pub mod raw;
mod security;
pub mod units;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use build::*;
pub use security::*;

/// Where in the config file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

/// One problem in the configuration.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub location: Option<Location>,
    /// Key path such as `route[2].path.regex` (empty for file-level problems).
    pub key: String,
    pub message: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(loc) = &self.location {
            write!(f, "{loc}: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in one load, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The text of the config file, used to turn byte offsets into line and column.
pub(crate) struct Source<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    pub fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        Location {
            file: self.path.to_path_buf(),
            line,
            column,
        }
    }

    pub fn error(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            location: span.map(|s| self.locate(s.start)),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Options for loading a config.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Create the development certificates in `server.dev_certs_dir` when they are missing
    /// (`wraith serve` does; `wraith test` reports that it would and builds everything else
    /// with a stand-in set made in a temporary directory).
    pub generate_dev_certs: bool,
}

/// Reads and builds the config file at `path`.
pub fn load(path: &Path, options: LoadOptions) -> Result<Config, ConfigErrors> {
    let text = crate::files::read_to_string(path, crate::files::SMALL).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            location: None,
            key: String::new(),
            message: format!("cannot read config file {}: {e}", path.display()),
        }])
    })?;
    load_str(path, &text, options)
}

/// Builds a config from text; `path` names it in errors and anchors relative paths.
pub fn load_str(path: &Path, text: &str, options: LoadOptions) -> Result<Config, ConfigErrors> {
    build::build(Source { path, text }, options)
}
