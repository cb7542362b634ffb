//! `s3://BUCKET/KEY`: an object, or a folder of them (every object under `KEY/`), in the bucket
//! the coordinator keeps its checkpoints in, usable wherever a spec names a file (as
//! `dataset://` references are).
//!
//! The coordinator reads it when it accepts the job and pins it to its content
//! (`s3://BUCKET/KEY@SHA256`), so every attempt reads the same bytes; the agent fetches it
//! through the coordinator (agents hold no object store credentials) into the cache it keeps
//! for pushed data sets, where the same bytes are one entry.

use super::pushed::{PushedPath, is_version};

/// What every such reference starts with.
pub const SCHEME: &str = "s3://";

/// A parsed reference; `key` has no trailing `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Path {
    pub bucket: String,
    pub key: String,
    /// The content's fingerprint, once pinned.
    pub version: Option<String>,
}

impl S3Path {
    /// `Some` when `text` is an `s3://` reference: parsed, or why it is malformed.
    pub fn parse(text: &str) -> Option<Result<S3Path, String>> {
        let rest = text.strip_prefix(SCHEME)?;
        // A pin is the last `@` and a whole fingerprint: an `@` elsewhere belongs to the key.
        let (rest, version) = match rest.rsplit_once('@') {
            Some((head, v)) if is_version(v) => (head, Some(v.to_string())),
            _ => (rest, None),
        };
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let key = key.trim_end_matches('/');
        Some(if bucket.is_empty() {
            Err(format!("`{text}` names no bucket: write s3://BUCKET/KEY"))
        } else if key.is_empty() {
            Err(format!("`{text}` names no object: write s3://BUCKET/KEY, a file or a folder"))
        } else if key.split('/').any(|p| p.is_empty() || p == "." || p == "..") || key.chars().any(char::is_control) {
            Err(format!("`{key}` must be a key without `.`, `..`, `//` or control characters"))
        } else {
            Ok(S3Path { bucket: bucket.to_string(), key: key.to_string(), version })
        })
    }

    /// The same reference pinned to `version`.
    pub fn pinned(&self, version: &str) -> S3Path {
        S3Path { version: Some(version.to_string()), ..self.clone() }
    }

    /// `s3://BUCKET/KEY`, unpinned: what the coordinator records its reads of this path under.
    pub fn url(&self) -> String {
        format!("{SCHEME}{}/{}", self.bucket, self.key)
    }
}

impl std::fmt::Display for S3Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())?;
        match &self.version {
            Some(v) => write!(f, "@{v}"),
            None => Ok(()),
        }
    }
}

/// A path the agent fetches from the coordinator into its cache, rather than reads where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    Pushed(PushedPath),
    S3(S3Path),
}

impl Fetched {
    /// `Some` when `text` is a `dataset://` or `s3://` reference: parsed, or why it is malformed.
    pub fn parse(text: &str) -> Option<Result<Fetched, String>> {
        if let Some(r) = PushedPath::parse(text) {
            return Some(r.map(Fetched::Pushed));
        }
        S3Path::parse(text).map(|r| r.map(Fetched::S3))
    }

    /// The pinned version's fingerprint: what the agent asks the coordinator for.
    pub fn version(&self) -> Option<&str> {
        match self {
            Fetched::Pushed(p) => p.version.as_deref(),
            Fetched::S3(s) => s.version.as_deref(),
        }
    }

    /// What the coordinator records the version under: the data set's name, or the S3 URL.
    pub fn record_name(&self) -> String {
        match self {
            Fetched::Pushed(p) => p.name.clone(),
            Fetched::S3(s) => s.url(),
        }
    }

    /// The file or folder inside the version ("" for all of it: its one file, or the folder).
    pub fn path_in_version(&self) -> &str {
        match self {
            Fetched::Pushed(p) => &p.path,
            Fetched::S3(_) => "",
        }
    }

    /// How messages name it: `NAME@SHORT` or `s3://BUCKET/KEY@SHORT`.
    pub fn label(&self) -> String {
        let short = |v: Option<&String>| v.map_or(String::new(), |v| format!("@{}", &v[..v.len().min(12)]));
        match self {
            Fetched::Pushed(p) => format!("{}{}", p.name, short(p.version.as_ref())),
            Fetched::S3(s) => format!("{}{}", s.url(), short(s.version.as_ref())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_pin_and_print_back() {
        assert!(S3Path::parse("data/wine.csv").is_none());
        let r = S3Path::parse("s3://lab/data/wine.csv").unwrap().unwrap();
        assert_eq!(r, S3Path { bucket: "lab".into(), key: "data/wine.csv".into(), version: None });
        let sha = "ab".repeat(32);
        let pinned = r.pinned(&sha);
        assert_eq!(pinned.to_string(), format!("s3://lab/data/wine.csv@{sha}"));
        assert_eq!(S3Path::parse(&pinned.to_string()).unwrap().unwrap(), pinned);
        // A folder's trailing slash is not part of its key; an `@` that is no pin is.
        assert_eq!(S3Path::parse("s3://lab/pics/").unwrap().unwrap().key, "pics");
        assert_eq!(S3Path::parse("s3://lab/a@b.csv").unwrap().unwrap().key, "a@b.csv");
        let fetched = Fetched::parse(&pinned.to_string()).unwrap().unwrap();
        assert_eq!((fetched.version(), fetched.path_in_version()), (Some(sha.as_str()), ""));
        assert_eq!(fetched.label(), "s3://lab/data/wine.csv@abababababab");
        let pushed = Fetched::parse("dataset://wine/a.csv").unwrap().unwrap();
        assert_eq!((pushed.version(), pushed.path_in_version(), pushed.label()), (None, "a.csv", "wine".into()));
        assert!(Fetched::parse("/data/wine.csv").is_none());
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        let err = |text: &str| S3Path::parse(text).unwrap().unwrap_err();
        assert!(err("s3:///a.csv").contains("names no bucket"));
        assert!(err("s3://lab").contains("names no object"));
        assert!(err("s3://lab/").contains("names no object"));
        assert!(err("s3://lab/a//b").contains("without `.`, `..`, `//`"));
        assert!(err("s3://lab/../b").contains("without `.`, `..`, `//`"));
    }
}
