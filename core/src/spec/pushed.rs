//! `dataset://NAME[@VERSION][/PATH]`: a file or folder of a data set pushed to the coordinator
//! with `gantry dataset push`, usable wherever a spec names a file (`train.dataset` and its
//! `test`, a SafeTensors `init_from`).
//!
//! The coordinator pins `NAME` to the version pushed last when it accepts the job
//! (`dataset://NAME@SHA256/PATH`), so every attempt of the job reads the same bytes; the agent
//! fetches that version into its cache and hands the job the cached path.

/// What every such reference starts with.
pub const SCHEME: &str = "dataset://";

/// The longest data set name.
pub const NAME_LIMIT: usize = 63;

/// A parsed reference; `path` is "" for the whole data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedPath {
    pub name: String,
    /// The version's sha256 (its fingerprint), once pinned.
    pub version: Option<String>,
    pub path: String,
}

impl PushedPath {
    /// `Some` when `text` is a `dataset://` reference: parsed, or why it is malformed.
    pub fn parse(text: &str) -> Option<Result<PushedPath, String>> {
        let rest = text.strip_prefix(SCHEME)?;
        let (head, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (name, version) = match head.split_once('@') {
            Some((name, version)) => (name, Some(version)),
            None => (head, None),
        };
        Some(Self::build(name, version, path.trim_end_matches('/')))
    }

    fn build(name: &str, version: Option<&str>, path: &str) -> Result<PushedPath, String> {
        check_name(name)?;
        if let Some(v) = version
            && !is_version(v)
        {
            return Err(format!("`@{v}` is not a data set version (64 lowercase hex digits of its sha256)"));
        }
        if !path.is_empty() && path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
            return Err(format!("`{path}` must be a relative path inside the data set, without `.`, `..` or `//`"));
        }
        Ok(PushedPath { name: name.to_string(), version: version.map(str::to_string), path: path.to_string() })
    }

    /// The same reference pinned to `version`.
    pub fn pinned(&self, version: &str) -> PushedPath {
        PushedPath { version: Some(version.to_string()), ..self.clone() }
    }
}

/// A version's fingerprint as references write it: 64 lowercase hex digits of a sha256.
pub(super) fn is_version(v: &str) -> bool {
    v.len() == 64 && v.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Data set names: what people type and what object keys and directories are named after.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_LIMIT
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "data set name `{name}`: 1 to {NAME_LIMIT} of a-z, 0-9, `-`, `_` and `.`, starting with a letter or digit"
        ))
    }
}

impl std::fmt::Display for PushedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}", self.name)?;
        if let Some(v) = &self.version {
            write!(f, "@{v}")?;
        }
        if !self.path.is_empty() {
            write!(f, "/{}", self.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_pin_and_print_back() {
        assert!(PushedPath::parse("data/wine.csv").is_none());
        let r = PushedPath::parse("dataset://wine/wine.csv").unwrap().unwrap();
        assert_eq!(r, PushedPath { name: "wine".into(), version: None, path: "wine.csv".into() });
        let sha = "ab".repeat(32);
        let pinned = r.pinned(&sha);
        assert_eq!(pinned.to_string(), format!("dataset://wine@{sha}/wine.csv"));
        assert_eq!(PushedPath::parse(&pinned.to_string()).unwrap().unwrap(), pinned);
        let whole = PushedPath::parse("dataset://digits-png/").unwrap().unwrap();
        assert_eq!((whole.path.as_str(), whole.to_string().as_str()), ("", "dataset://digits-png"));
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        let err = |text: &str| PushedPath::parse(text).unwrap().unwrap_err();
        assert!(err("dataset://Wine/a.csv").contains("data set name `Wine`"));
        assert!(err("dataset:///a.csv").contains("data set name ``"));
        assert!(err("dataset://wine@v2/a.csv").contains("`@v2` is not a data set version"));
        assert!(err("dataset://wine/../etc/passwd").contains("without `.`, `..`"));
        assert!(err("dataset://wine/a//b").contains("without `.`, `..` or `//`"));
    }
}
