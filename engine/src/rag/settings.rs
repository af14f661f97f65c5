//! Settings of the RAG service, from `MOERA_*` environment variables and an optional `.env`
//! file (real environment variables win over the file).
//!
//! | variable | field | default |
//! |---|---|---|
//! | `MOERA_API_KEY` | [`api_key`](Settings::api_key) (secret) | none |
//! | `MOERA_MODEL` | [`model`](Settings::model) | `smollm2` |
//! | `MOERA_ADAPTER` | [`adapter`](Settings::adapter) | none |
//! | `MOERA_DEVICE` | [`device`](Settings::device): `flex`, `wgpu` or `cuda` | none (automatic) |
//! | `MOERA_EMBEDDER` | [`embedder`](Settings::embedder) | `minilm` |
//! | `MOERA_DATA_DIR` | [`data_dir`](Settings::data_dir) | `$MOERA_HOME/collections` (`~/.cache/moera/collections`) |
//! | `MOERA_COLLECTION` | [`collection`](Settings::collection) | `default` |
//! | `MOERA_CACHE_TTL` | [`cache_ttl`](Settings::cache_ttl), seconds (0 disables) | 3600 |
//! | `MOERA_INFERENCE_CACHE_CAPACITY` | [`inference_cache_capacity`](Settings::inference_cache_capacity) (0 disables) | 256 |
//! | `MOERA_REDIS_URL` | [`redis_url`](Settings::redis_url) (secret: may hold a password) | none |
//! | `MOERA_BREAKER_FAILURE_THRESHOLD` | [`breaker_failure_threshold`](Settings::breaker_failure_threshold) (≥ 1) | 5 |
//! | `MOERA_BREAKER_COOLDOWN` | [`breaker_cooldown`](Settings::breaker_cooldown), seconds | 30 |
//! | `MOERA_BIND` | [`bind`](Settings::bind) | `127.0.0.1:8080` |
//! | `MOERA_MAX_REQUEST_BYTES` | [`max_request_bytes`](Settings::max_request_bytes) (≥ 1) | 1048576 |
//!
//! An empty value counts as unset. Durations take whole or fractional seconds.
//!
//! The `.env` file may hold other tools' settings too: its lines that cannot be parsed are
//! skipped with a warning (naming the file and line, never the text) unless their key starts
//! with `MOERA_`, which is an error. Double-quoted values may span several lines.
//!
//! ```
//! use moera_engine::rag::settings::Settings;
//!
//! let vars = [
//!     ("MOERA_API_KEY".to_string(), "sk-123".to_string()),
//!     ("MOERA_CACHE_TTL".to_string(), "60".to_string()),
//! ];
//! let settings = Settings::load(None, vars)?;
//! assert_eq!(settings.cache_ttl.as_secs(), 60);
//! assert_eq!(settings.api_key.as_ref().map(|k| k.expose()), Some("sk-123"));
//! assert!(!format!("{settings:?}").contains("sk-123"));
//! # Ok::<(), moera_engine::Error>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::device::DeviceKind;
use crate::error::{Error, Result};
use crate::rag::breaker::BreakerConfig;

const API_KEY: &str = "MOERA_API_KEY";
const MODEL: &str = "MOERA_MODEL";
const ADAPTER: &str = "MOERA_ADAPTER";
const DEVICE: &str = "MOERA_DEVICE";
const EMBEDDER: &str = "MOERA_EMBEDDER";
const HOME: &str = "MOERA_HOME";
const DATA_DIR: &str = "MOERA_DATA_DIR";
const COLLECTION: &str = "MOERA_COLLECTION";
const CACHE_TTL: &str = "MOERA_CACHE_TTL";
const INFERENCE_CACHE_CAPACITY: &str = "MOERA_INFERENCE_CACHE_CAPACITY";
const REDIS_URL: &str = "MOERA_REDIS_URL";
const BREAKER_FAILURE_THRESHOLD: &str = "MOERA_BREAKER_FAILURE_THRESHOLD";
const BREAKER_COOLDOWN: &str = "MOERA_BREAKER_COOLDOWN";
const BIND: &str = "MOERA_BIND";
const MAX_REQUEST_BYTES: &str = "MOERA_MAX_REQUEST_BYTES";

/// A string that must not reach logs: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; use it only where it is needed (comparing a key, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Everything the RAG service is configured with; see the [module docs](self) for the
/// variables and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Key clients must present; `None` leaves the API open.
    pub api_key: Option<Secret>,
    /// Model alias, path or hub id (see [`crate::hub::resolve_model`]).
    pub model: String,
    /// LoRA adapter folder to load on top of the model.
    pub adapter: Option<PathBuf>,
    /// Canonical device name (`flex`, `wgpu` or `cuda`); `None` picks automatically.
    pub device: Option<String>,
    /// Embedding model alias or path.
    pub embedder: String,
    /// Folder of the vector collections.
    pub data_dir: PathBuf,
    /// Collection queried when a request names none.
    pub collection: String,
    /// Time to live of cached RAG answers; zero disables the result cache.
    pub cache_ttl: Duration,
    /// Entries of the inference cache; zero disables it.
    pub inference_cache_capacity: usize,
    /// Redis for the result cache; `None` keeps it in process.
    pub redis_url: Option<Secret>,
    /// Consecutive generation failures that open the circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long the open breaker refuses calls.
    pub breaker_cooldown: Duration,
    /// Address the HTTP server listens on.
    pub bind: SocketAddr,
    /// Largest accepted request body.
    pub max_request_bytes: usize,
}

impl Default for Settings {
    /// The defaults, with `data_dir` under [`crate::hub::moera_home`].
    fn default() -> Self {
        Self::defaults(crate::hub::moera_home())
    }
}

impl Settings {
    fn defaults(home: PathBuf) -> Self {
        Self {
            api_key: None,
            model: "smollm2".into(),
            adapter: None,
            device: None,
            embedder: "minilm".into(),
            data_dir: home.join("collections"),
            collection: "default".into(),
            cache_ttl: crate::rag::cache::DEFAULT_TTL,
            inference_cache_capacity: 256,
            redis_url: None,
            breaker_failure_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_request_bytes: 1 << 20,
        }
    }

    /// Loads from the process environment and from `.env` in the current directory, if
    /// there is one.
    pub fn from_env() -> Result<Self> {
        let mut vars = Vec::new();
        for (key, value) in std::env::vars_os() {
            // Only our own variables need to be text; others are none of our business.
            let Some(key) = key.to_str().filter(|k| k.starts_with("MOERA_")) else {
                continue;
            };
            let value = value.into_string().map_err(|_| Error::Settings {
                variable: key.to_owned(),
                reason: "the value is not valid UTF-8".into(),
            })?;
            vars.push((key.to_owned(), value));
        }
        let env_file = Path::new(".env");
        Self::load(env_file.is_file().then_some(env_file), vars)
    }

    /// Loads from `vars` (the environment) over the `KEY=VALUE` lines of `env_file`. Only
    /// `MOERA_*` keys are read; the file's other keys are ignored (not exported), and its
    /// lines that cannot be parsed are skipped with a warning unless they set a `MOERA_*`
    /// key.
    pub fn load(
        env_file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        // Empty counts as unset, so an empty variable neither overrides the file nor fails
        // validation.
        let ours = |(k, v): &(String, String)| k.starts_with("MOERA_") && !v.is_empty();
        let mut merged = HashMap::new();
        if let Some(path) = env_file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            merged.extend(parse_dotenv(&text, path)?.into_iter().filter(ours));
        }
        merged.extend(vars.into_iter().filter(ours));
        let vars = Vars(merged);

        let home = vars
            .get(HOME)
            .map(PathBuf::from)
            .unwrap_or_else(crate::hub::default_moera_home);
        let mut s = Self::defaults(home);
        s.api_key = vars.get(API_KEY).map(Secret::new);
        if let Some(model) = vars.get(MODEL) {
            s.model = model.to_owned();
        }
        s.adapter = vars.get(ADAPTER).map(PathBuf::from);
        if let Some(name) = vars.get(DEVICE) {
            let kind = DeviceKind::from_str(name.trim()).map_err(|_| Error::Settings {
                variable: DEVICE.into(),
                reason: format!("expected flex, wgpu or cuda, got {name:?}"),
            })?;
            s.device = Some(kind.to_string());
        }
        if let Some(embedder) = vars.get(EMBEDDER) {
            s.embedder = embedder.to_owned();
        }
        if let Some(dir) = vars.get(DATA_DIR) {
            s.data_dir = PathBuf::from(dir);
        }
        if let Some(collection) = vars.get(COLLECTION) {
            s.collection = collection.to_owned();
        }
        if let Some(ttl) = vars.seconds(CACHE_TTL)? {
            s.cache_ttl = ttl;
        }
        if let Some(capacity) = vars.number(INFERENCE_CACHE_CAPACITY)? {
            s.inference_cache_capacity = capacity;
        }
        if let Some(url) = vars.get(REDIS_URL) {
            let known = ["redis://", "rediss://", "redis+unix://", "unix://"];
            if !known.iter().any(|scheme| url.starts_with(scheme)) {
                // The URL may hold a password: do not quote it.
                return Err(Error::Settings {
                    variable: REDIS_URL.into(),
                    reason: "expected a redis://, rediss:// or unix:// URL".into(),
                });
            }
            s.redis_url = Some(Secret::new(url));
        }
        if let Some(threshold) = vars.number(BREAKER_FAILURE_THRESHOLD)? {
            s.breaker_failure_threshold = positive(BREAKER_FAILURE_THRESHOLD, threshold)?;
        }
        if let Some(cooldown) = vars.seconds(BREAKER_COOLDOWN)? {
            s.breaker_cooldown = cooldown;
        }
        if let Some(bind) = vars.get(BIND) {
            s.bind = bind.trim().parse().map_err(|_| Error::Settings {
                variable: BIND.into(),
                reason: format!(
                    "expected IP:PORT such as 127.0.0.1:8080 or [::1]:8080, got {bind:?}"
                ),
            })?;
        }
        if let Some(bytes) = vars.number(MAX_REQUEST_BYTES)? {
            s.max_request_bytes = positive(MAX_REQUEST_BYTES, bytes)?;
        }
        Ok(s)
    }

    /// [`device`](Self::device) as a [`DeviceKind`].
    pub fn device_kind(&self) -> Option<DeviceKind> {
        self.device.as_deref().and_then(|d| d.parse().ok())
    }

    /// The circuit breaker's configuration.
    pub fn breaker_config(&self) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: self.breaker_failure_threshold,
            cooldown: self.breaker_cooldown,
        }
    }
}

struct Vars(HashMap<String, String>);

impl Vars {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn number<T: FromStr>(&self, name: &str) -> Result<Option<T>> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        raw.trim().parse().map(Some).map_err(|_| Error::Settings {
            variable: name.into(),
            reason: format!("expected a non-negative whole number, got {raw:?}"),
        })
    }

    fn seconds(&self, name: &str) -> Result<Option<Duration>> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        let text = raw.trim();
        if let Ok(whole) = text.parse::<u64>() {
            return Ok(Some(Duration::from_secs(whole)));
        }
        text.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .map(Some)
            .ok_or_else(|| Error::Settings {
                variable: name.into(),
                reason: format!("expected a non-negative number of seconds, got {raw:?}"),
            })
    }
}

fn positive<T: PartialEq + Default>(name: &str, value: T) -> Result<T> {
    if value == T::default() {
        return Err(Error::Settings {
            variable: name.into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(value)
}

/// The `KEY=VALUE` pairs of a `.env` file: blank lines and `#` comments are skipped, an
/// `export ` prefix is allowed, values may be single-quoted (literal) or double-quoted (with
/// `\n`, `\t`, `\r`, `\"`, `\\`, `\$` escapes); an unquoted value ends at a ` #` comment.
/// A double-quoted value may span lines, as in python-dotenv: it continues until the closing
/// unescaped `"`, keeping the line breaks.
///
/// The file may be written for other tools too, so a line that cannot be parsed is skipped
/// with a warning, unless its key starts with `MOERA_`: then it is an error. Both name the
/// file and line, never the line's text, which may hold a secret.
fn parse_dotenv(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let mut pairs = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let number = index + 1;
        let line = lines[index].trim_start();
        index += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export")
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .map_or(line, str::trim_start);
        let (key, parsed) = match line.split_once('=') {
            None => (line.trim_end(), Err("expected KEY=VALUE")),
            Some((key, rest)) => {
                let key = key.trim_end();
                if is_valid_key(key) {
                    let (value, continuation) = parse_value(rest.trim_start(), &lines[index..]);
                    // The lines of a multi-line value are consumed even when its ending is
                    // malformed: they are not assignments of their own.
                    index += continuation;
                    (key, value)
                } else {
                    (
                        key,
                        Err(
                            "expected KEY=VALUE with a KEY of ASCII letters, digits and underscores",
                        ),
                    )
                }
            }
        };
        match parsed {
            Ok(value) => pairs.push((key.to_owned(), value)),
            Err(reason) if key.starts_with("MOERA_") => {
                return Err(Error::Settings {
                    variable: format!("{}:{number}", path.display()),
                    reason: reason.into(),
                });
            }
            Err(reason) => tracing::warn!(
                file = %path.display(),
                line = number,
                reason,
                "skipping a .env line that cannot be parsed (it sets no MOERA_ variable)"
            ),
        }
    }
    Ok(pairs)
}

fn is_valid_key(key: &str) -> bool {
    key.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The value starting at `first` (the rest of its line, after `=`), and how many of the
/// `following` lines it took up (a double-quoted value may go on over several). An
/// unterminated quote takes up none, so that the lines after it are still read.
fn parse_value(
    first: &str,
    following: &[&str],
) -> (std::result::Result<String, &'static str>, usize) {
    let quote = match first.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            // `#` starts a comment only after whitespace, so `a#b` stays a value.
            let end = first
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || first[..i].ends_with(char::is_whitespace)))
                .map_or(first.len(), |(i, _)| i);
            return (Ok(first[..end].trim_end().to_owned()), 0);
        }
    };
    let mut value = String::new();
    let mut segment = &first[1..];
    let mut used = 0;
    loop {
        let mut chars = segment.char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                let after = segment[i + 1..].trim_start();
                let result = if after.is_empty() || after.starts_with('#') {
                    Ok(value)
                } else {
                    Err("unexpected text after the closing quote")
                };
                return (result, used);
            }
            if c == '\\' && quote == '"' {
                match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, 'r')) => value.push('\r'),
                    Some((_, e @ ('"' | '\\' | '$'))) => value.push(e),
                    // Unknown escapes stay as written, as in the shell; so does a backslash
                    // at the end of a line.
                    Some((_, other)) => {
                        value.push('\\');
                        value.push(other);
                    }
                    None => value.push('\\'),
                }
                continue;
            }
            value.push(c);
        }
        match following.get(used) {
            Some(next) if quote == '"' => {
                value.push('\n');
                segment = next;
                used += 1;
            }
            _ => {
                let reason = if quote == '"' {
                    "unterminated double quote"
                } else {
                    "unterminated single quote"
                };
                return (Err(reason), 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A `.env` file in a fresh temporary folder, removed on drop.
    struct EnvFile {
        dir: PathBuf,
        path: PathBuf,
    }

    impl EnvFile {
        fn new(name: &str, text: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("moera-settings-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(".env");
            std::fs::write(&path, text).unwrap();
            Self { dir, path }
        }
    }

    impl Drop for EnvFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn settings_error(pairs: &[(&str, &str)]) -> (String, String) {
        match Settings::load(None, vars(pairs)) {
            Err(Error::Settings { variable, reason }) => (variable, reason),
            other => panic!("expected a settings error for {pairs:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let s = Settings::load(None, vars(&[("MOERA_HOME", "/srv/moera")])).unwrap();
        assert_eq!(s.api_key, None);
        assert_eq!(s.model, "smollm2");
        assert_eq!(s.adapter, None);
        assert_eq!(s.device, None);
        assert_eq!(s.embedder, "minilm");
        assert_eq!(s.data_dir, Path::new("/srv/moera/collections"));
        assert_eq!(s.collection, "default");
        assert_eq!(s.cache_ttl, Duration::from_secs(3600));
        assert_eq!(s.inference_cache_capacity, 256);
        assert_eq!(s.redis_url, None);
        assert_eq!(s.breaker_failure_threshold, 5);
        assert_eq!(s.breaker_cooldown, Duration::from_secs(30));
        assert_eq!(s.bind, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(s.max_request_bytes, 1024 * 1024);
        assert_eq!(
            s.breaker_config(),
            BreakerConfig {
                failure_threshold: 5,
                cooldown: Duration::from_secs(30)
            }
        );

        // Without MOERA_HOME: the hub's default home.
        let s = Settings::load(None, Vec::new()).unwrap();
        assert_eq!(
            s.data_dir,
            crate::hub::default_moera_home().join("collections")
        );
        assert!(s.data_dir.ends_with(".cache/moera/collections"));
    }

    #[test]
    fn every_variable_is_read() {
        let s = Settings::load(
            None,
            vars(&[
                ("MOERA_API_KEY", "k"),
                ("MOERA_MODEL", "org/model"),
                ("MOERA_ADAPTER", "/a/sql"),
                ("MOERA_DEVICE", "CPU"),
                ("MOERA_EMBEDDER", "/models/e5"),
                ("MOERA_DATA_DIR", "/data"),
                ("MOERA_COLLECTION", "docs"),
                ("MOERA_CACHE_TTL", "1.5"),
                ("MOERA_INFERENCE_CACHE_CAPACITY", "0"),
                ("MOERA_REDIS_URL", "redis://localhost:6379/1"),
                ("MOERA_BREAKER_FAILURE_THRESHOLD", " 3 "),
                ("MOERA_BREAKER_COOLDOWN", "10"),
                ("MOERA_BIND", "[::1]:9000"),
                ("MOERA_MAX_REQUEST_BYTES", "2048"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.api_key.as_ref().map(Secret::expose), Some("k"));
        assert_eq!(s.model, "org/model");
        assert_eq!(s.adapter.as_deref(), Some(Path::new("/a/sql")));
        // Aliases are accepted and stored under the canonical name.
        assert_eq!(s.device.as_deref(), Some("flex"));
        assert_eq!(s.device_kind(), Some(DeviceKind::Flex));
        assert_eq!(s.embedder, "/models/e5");
        assert_eq!(s.data_dir, Path::new("/data"));
        assert_eq!(s.collection, "docs");
        assert_eq!(s.cache_ttl, Duration::from_millis(1500));
        assert_eq!(s.inference_cache_capacity, 0);
        assert_eq!(
            s.redis_url.as_ref().map(Secret::expose),
            Some("redis://localhost:6379/1")
        );
        assert_eq!(s.breaker_failure_threshold, 3);
        assert_eq!(s.breaker_cooldown, Duration::from_secs(10));
        assert_eq!(s.bind, "[::1]:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(s.max_request_bytes, 2048);
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = EnvFile::new(
            "override",
            "MOERA_MODEL=from-file\nMOERA_COLLECTION=file-collection\nMOERA_API_KEY=file-key\n",
        );
        let s = Settings::load(
            Some(&file.path),
            vars(&[
                ("MOERA_MODEL", "from-env"),
                // Empty counts as unset: it does not wipe the file's value.
                ("MOERA_API_KEY", ""),
            ]),
        )
        .unwrap();
        assert_eq!(s.model, "from-env");
        assert_eq!(s.collection, "file-collection");
        assert_eq!(s.api_key.as_ref().map(Secret::expose), Some("file-key"));
    }

    #[test]
    fn dotenv_quoting_and_comments() {
        let text = "\u{feff}# a comment\n\
            \n\
            export MOERA_MODEL=smollm2-local   # trailing comment\n\
            MOERA_COLLECTION = 'single # not a comment \\n literal'\n\
            MOERA_EMBEDDER=\"double \\\"quoted\\\" \\n line\\\\ \\d\" # comment\n\
            MOERA_ADAPTER=/path/with#hash\r\n\
            \t  MOERA_DATA_DIR=\n\
            MOERA_API_KEY=\"\"\n\
            NOT_OURS=whatever\n\
            exporter=x\n";
        let pairs = parse_dotenv(text, Path::new(".env")).unwrap();
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("MOERA_MODEL"), Some("smollm2-local"));
        assert_eq!(
            get("MOERA_COLLECTION"),
            Some("single # not a comment \\n literal")
        );
        assert_eq!(
            get("MOERA_EMBEDDER"),
            Some("double \"quoted\" \n line\\ \\d")
        );
        assert_eq!(get("MOERA_ADAPTER"), Some("/path/with#hash"));
        assert_eq!(get("MOERA_DATA_DIR"), Some(""));
        assert_eq!(get("MOERA_API_KEY"), Some(""));
        assert_eq!(get("NOT_OURS"), Some("whatever"));
        assert_eq!(get("exporter"), Some("x"));

        let file = EnvFile::new("quoting", text);
        let s = Settings::load(Some(&file.path), vars(&[("MOERA_HOME", "/h")])).unwrap();
        assert_eq!(s.model, "smollm2-local");
        assert_eq!(s.adapter.as_deref(), Some(Path::new("/path/with#hash")));
        // Empty values keep the defaults.
        assert_eq!(s.data_dir, Path::new("/h/collections"));
        assert_eq!(s.api_key, None);
    }

    #[test]
    fn later_lines_win_in_the_file() {
        let pairs = parse_dotenv("A=1\nA=2\n", Path::new("x")).unwrap();
        assert_eq!(pairs.last().map(|(_, v)| v.as_str()), Some("2"));
    }

    #[test]
    fn bad_dotenv_lines_name_the_file_and_line() {
        // Only lines that set (or try to set) a MOERA_ key are errors.
        for (text, line, reason) in [
            ("MOERA_MODEL=ok\n\nMOERA_COLLECTION docs\n", 3, "KEY=VALUE"),
            ("# c\nexport MOERA_API_KEY\n", 2, "KEY=VALUE"),
            ("MOERA_MY-KEY=value\n", 1, "KEY"),
            (
                "MOERA_API_KEY=\"sk-unterminated\n",
                1,
                "unterminated double quote",
            ),
            (
                // A multi-line value never closed: the error names the line it starts on.
                "A=1\nMOERA_API_KEY=\"sk-unterminated\nsk-more\nB=2\n",
                2,
                "unterminated double quote",
            ),
            (
                "MOERA_API_KEY='sk-unterminated\n",
                1,
                "unterminated single quote",
            ),
            ("MOERA_MODEL=\"a\" b\n", 1, "after the closing quote"),
            (
                "MOERA_API_KEY=\"sk-a\nsk-b\" sk-c\n",
                1,
                "after the closing quote",
            ),
        ] {
            let file = EnvFile::new(&format!("bad{line}{}", reason.len()), text);
            match Settings::load(Some(&file.path), Vec::new()) {
                Err(Error::Settings {
                    variable,
                    reason: r,
                }) => {
                    assert_eq!(
                        variable,
                        format!("{}:{line}", file.path.display()),
                        "{text:?}"
                    );
                    assert!(r.contains(reason), "{r:?} for {text:?}");
                    assert!(
                        !r.contains("sk-"),
                        "the reason must not quote the line: {r}"
                    );
                }
                other => panic!("expected a settings error for {text:?}, got {other:?}"),
            }
        }
    }

    use crate::rag::captured_logs::Logged;

    #[test]
    fn other_tools_bad_lines_are_skipped_with_a_warning() {
        let text = "MOERA_MODEL=m\n\
            MY-KEY=sk-dash\n\
            this line is sk-prose\n\
            =sk-nokey\n\
            SINGLE='sk-open\n\
            JUNK=\"sk-a\" sk-b\n\
            SPAN=\"sk-1\n\
            MOERA_EMBEDDER=inside-a-value\n\
            sk-2\" sk-3\n\
            OTHER=\"sk-never closed\n\
            MOERA_COLLECTION=docs\n\
            MOERA_API_KEY=key\n";
        let file = EnvFile::new("foreign", text);
        let logged = Logged::default();
        let s = tracing::subscriber::with_default(logged.clone(), || {
            Settings::load(Some(&file.path), vars(&[("MOERA_HOME", "/h")]))
        })
        .unwrap();
        assert_eq!(s.model, "m");
        // The line after an unterminated quote is still read...
        assert_eq!(s.collection, "docs");
        // ... but not the lines of a closed multi-line value, even a malformed one.
        assert_eq!(s.embedder, "minilm");
        assert_eq!(s.api_key.as_ref().map(Secret::expose), Some("key"));

        let logged = logged.events();
        let warnings: Vec<&String> = logged.iter().filter(|e| e.starts_with("WARN")).collect();
        let file_name = file.path.display().to_string();
        let lines: Vec<usize> = warnings
            .iter()
            .map(|w| {
                assert!(w.contains(&file_name), "{w}");
                assert!(!w.contains("sk-"), "a warning must not quote the line: {w}");
                let at = w.find("line=").expect("the line number") + 5;
                w[at..].split(' ').next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 10], "{warnings:?}");
    }

    #[test]
    fn multi_line_double_quoted_values() {
        let text = "MOERA_API_KEY=\"first\n\
            \tsecond \\\"quoted\\\" \\n\n\
            \n\
            last\" # comment\n\
            CERT=\"-----BEGIN-----\r\n\
            MOERA_MODEL=not-a-setting\r\n\
            -----END-----\"\r\n\
            MOERA_COLLECTION=after\n\
            MOERA_DATA_DIR=\"/srv/data\"\n\
            EMPTY=\"\n\
            \"\n";
        let pairs = parse_dotenv(text, Path::new(".env")).unwrap();
        assert_eq!(
            pairs,
            vars(&[
                ("MOERA_API_KEY", "first\n\tsecond \"quoted\" \n\n\nlast"),
                (
                    "CERT",
                    "-----BEGIN-----\nMOERA_MODEL=not-a-setting\n-----END-----"
                ),
                ("MOERA_COLLECTION", "after"),
                ("MOERA_DATA_DIR", "/srv/data"),
                ("EMPTY", "\n"),
            ])
        );
        let file = EnvFile::new("multiline", text);
        let s = Settings::load(Some(&file.path), Vec::new()).unwrap();
        assert_eq!(s.model, "smollm2");
        assert_eq!(s.collection, "after");
        assert_eq!(
            s.api_key.as_ref().map(Secret::expose),
            Some("first\n\tsecond \"quoted\" \n\n\nlast")
        );
        // Single quotes stay on one line.
        assert!(parse_dotenv("MOERA_API_KEY='a\nb'\n", Path::new(".env")).is_err());
    }

    #[test]
    fn huge_durations_parse_without_panicking() {
        let s = Settings::load(
            None,
            vars(&[
                ("MOERA_CACHE_TTL", "1e19"),
                ("MOERA_BREAKER_COOLDOWN", "18446744073709551615"),
            ]),
        )
        .unwrap();
        assert!(s.cache_ttl > Duration::from_secs(1 << 62));
        assert_eq!(s.breaker_cooldown, Duration::from_secs(u64::MAX));
        // What the service builds from them must not panic either.
        let cache = crate::rag::cache::MemoryResultCache::new(4, s.cache_ttl);
        crate::rag::cache::ResultCache::put(&cache, "k", "v");
        assert_eq!(
            crate::rag::cache::ResultCache::get(&cache, "k").as_deref(),
            Some("v")
        );
        let breaker = crate::rag::breaker::CircuitBreaker::new(s.breaker_config());
        for _ in 0..s.breaker_failure_threshold {
            let _ = breaker.call(|| {
                Err::<(), _>(Error::Io {
                    path: "backend".into(),
                    source: std::io::Error::other("down"),
                })
            });
        }
        assert!(matches!(
            breaker.call(|| Ok(())),
            Err(Error::ServiceUnavailable { .. })
        ));
    }

    #[test]
    fn a_missing_env_file_given_explicitly_is_an_error() {
        let path = std::env::temp_dir().join("moera-settings-no-such-dir/.env");
        assert!(matches!(
            Settings::load(Some(&path), Vec::new()),
            Err(Error::Io { path: p, .. }) if p == path
        ));
    }

    #[test]
    fn every_validation_error_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("MOERA_CACHE_TTL", "an hour"),
            ("MOERA_CACHE_TTL", "-1"),
            ("MOERA_CACHE_TTL", "NaN"),
            ("MOERA_INFERENCE_CACHE_CAPACITY", "lots"),
            ("MOERA_INFERENCE_CACHE_CAPACITY", "-5"),
            ("MOERA_BREAKER_FAILURE_THRESHOLD", "0"),
            ("MOERA_BREAKER_FAILURE_THRESHOLD", "five"),
            ("MOERA_BREAKER_COOLDOWN", "soon"),
            ("MOERA_DEVICE", "tpu"),
            ("MOERA_BIND", "localhost"),
            ("MOERA_BIND", "127.0.0.1"),
            ("MOERA_BIND", "127.0.0.1:99999"),
            ("MOERA_MAX_REQUEST_BYTES", "0"),
            ("MOERA_MAX_REQUEST_BYTES", "1MB"),
            ("MOERA_REDIS_URL", "http://:hunter2@cache:6379"),
        ];
        for &(name, value) in cases {
            let (variable, reason) = settings_error(&[(name, value)]);
            assert_eq!(variable, name, "for {value:?}");
            assert!(!reason.is_empty());
            let message = Error::Settings { variable, reason }.to_string();
            assert!(message.contains(name), "{message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn debug_output_hides_secrets() {
        for url in [
            "redis://:hunter2@cache.internal:6379/0",
            "redis://user:hunter2@cache.internal:6379/0",
            "redis+unix:///tmp/redis.sock?db=0&pass=hunter2",
            "unix:///tmp/redis.sock?pass=hunter2",
            "rediss://cache.internal/?password=hunter2",
        ] {
            let s = Settings::load(
                None,
                vars(&[
                    ("MOERA_API_KEY", "sk-live-0123456789"),
                    ("MOERA_REDIS_URL", url),
                ]),
            )
            .unwrap();
            assert_eq!(s.redis_url.as_ref().map(Secret::expose), Some(url));
            for text in [format!("{s:?}"), format!("{s:#?}")] {
                assert!(!text.contains("sk-live"), "{text}");
                assert!(!text.contains("hunter2"), "{text}");
                assert!(text.contains("***"), "{text}");
            }
        }
        let key = Secret::new("sk-live-0123456789");
        assert_eq!(key.to_string(), "***");
        assert_eq!(format!("{key:?}"), "***");
        assert_eq!(key.expose(), "sk-live-0123456789");
    }

    #[test]
    fn default_matches_an_empty_environment_apart_from_home() {
        let home = crate::hub::moera_home();
        let from_vars =
            Settings::load(None, vars(&[("MOERA_HOME", home.to_str().unwrap_or("/"))])).unwrap();
        if home.to_str().is_some() {
            assert_eq!(Settings::default(), from_vars);
        }
    }
}
