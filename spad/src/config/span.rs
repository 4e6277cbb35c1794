//! Where a configuration value came from, and the small value types every section shares.
//!
//! This is the leaf of the configuration: it imports nothing from the sections (only the
//! bounds in `limits`), so any section
//! (including `knock::config`) can use [`Located`], [`at`], [`resolve`] and [`Seconds`]
//! without an import cycle.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use spa_shared::duration;
use toml::Spanned;

/// Where in the source text an error is, plus the message; turned into a `ConfigError`.
pub(crate) struct Located {
    pub span: std::ops::Range<usize>,
    pub message: String,
}

/// An error at the location of a spanned value.
pub(crate) fn at<T>(spanned: &Spanned<T>, message: impl Into<String>) -> Located {
    Located {
        span: spanned.span(),
        message: message.into(),
    }
}

/// 1-based line and column of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// `path` made absolute against the config file's directory.
pub(crate) fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// A duration in config: `"30s"`, `"1h"` or a number of seconds, at most
/// [`MAX_TIMEOUT`](super::limits::MAX_TIMEOUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        let duration = match Raw::deserialize(d)? {
            Raw::Number(n) => Duration::from_secs(n),
            Raw::Text(t) => duration::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a duration; write e.g. \"30s\", \"15m\", \"1h30m\" or a number of seconds"
                ))
            })?,
        };
        // Every duration in the file ends up as (or bounds) a kernel set timeout.
        match super::limits::timeout_problem(duration) {
            Some(problem) => Err(serde::de::Error::custom(problem)),
            None => Ok(Seconds(duration)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
