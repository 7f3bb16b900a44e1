//! `routes.yaml`: parsed with unknown keys rejected, `${VAR}` substituted,
//! validated with every error naming its key path, then resolved into [`Settings`].

mod interpolate;
mod raw;
mod resolve;
mod settings;
mod units;

use std::fmt;
use std::path::{Path, PathBuf};

pub use interpolate::EnvValues;
pub use resolve::{standard_webhooks_secret, window_past_retention};
pub use settings::*;
pub use units::{parse_duration, parse_size};

/// One thing wrong with the configuration, at a key path such as
/// `targets[2].retry.max_backoff`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {}", path.display(), problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    /// The problems found, each with its key path (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

/// Reads, checks and resolves the configuration file at `path`, taking
/// `${VAR}` values from the process environment.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    load_str(&text, path, &|name| std::env::var(name).ok())
}

/// [`load`] for text already read; `path` places relative file names and
/// names the file in errors.
pub fn load_str(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
    let mut tree: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| invalid(vec![Problem { key: String::new(), message: format!("invalid YAML: {e}") }]))?;
    if tree.is_null() {
        return Err(invalid(vec![Problem { key: String::new(), message: "the file is empty".into() }]));
    }
    let from_env = std::cell::RefCell::new(EnvValues::default());
    let lookup = |name: &str| {
        let value = env(name);
        if let Some(v) = &value {
            from_env.borrow_mut().note(name, v);
        }
        value
    };
    let problems = interpolate::interpolate_tree(&mut tree, &lookup);
    let from_env = from_env.into_inner();
    // Errors may quote a value the environment gave: shown by its name.
    let invalid = |problems: Vec<Problem>| {
        let redacted = problems.into_iter().map(|p| Problem { message: from_env.redact(&p.message), ..p });
        invalid(redacted.collect())
    };
    if !problems.is_empty() {
        return Err(invalid(problems.into_iter().map(|(key, message)| Problem { key, message }).collect()));
    }
    let raw: raw::RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        invalid(vec![Problem { key, message: e.into_inner().to_string() }])
    })?;
    let settings = resolve::resolve(raw, path).map_err(invalid)?;
    Ok(Settings { from_env, ..settings })
}

#[cfg(test)]
mod tests;
