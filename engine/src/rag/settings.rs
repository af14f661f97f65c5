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
    /// `MOERA_*` keys are read; the file's other keys are ignored (not exported).
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
/// `\n`, `\t`, `\r`, `\"`, `\\`, `\$` escapes); an unquoted value ends at a ` #` comment. An
/// error names the file and line (not its text, which may hold a secret).
fn parse_dotenv(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pairs = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let fail = |reason: &str| Error::Settings {
            variable: format!("{}:{}", path.display(), index + 1),
            reason: reason.into(),
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export")
            .filter(|rest| rest.starts_with(char::is_whitespace))
            .map_or(line, str::trim_start);
        let Some((key, rest)) = line.split_once('=') else {
            return Err(fail("expected KEY=VALUE"));
        };
        let key = key.trim_end();
        let valid_key = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(fail(
                "expected KEY=VALUE with a KEY of ASCII letters, digits and underscores",
            ));
        }
        let value = parse_value(rest.trim_start()).map_err(fail)?;
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

fn parse_value(s: &str) -> std::result::Result<String, &'static str> {
    let quote = match s.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            // `#` starts a comment only after whitespace, so `a#b` stays a value.
            let end = s
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || s[..i].ends_with(char::is_whitespace)))
                .map_or(s.len(), |(i, _)| i);
            return Ok(s[..end].trim_end().to_owned());
        }
    };
    let body = &s[1..];
    let mut value = String::new();
    let mut chars = body.char_indices();
    let mut close = None;
    while let Some((i, c)) = chars.next() {
        if c == quote {
            close = Some(i);
            break;
        }
        if c == '\\' && quote == '"' {
            match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, 't')) => value.push('\t'),
                Some((_, 'r')) => value.push('\r'),
                Some((_, e @ ('"' | '\\' | '$'))) => value.push(e),
                // Unknown escapes stay as written, as in the shell.
                Some((_, other)) => {
                    value.push('\\');
                    value.push(other);
                }
                None => break,
            }
            continue;
        }
        value.push(c);
    }
    let Some(close) = close else {
        return Err(if quote == '"' {
            "unterminated double quote"
        } else {
            "unterminated single quote"
        });
    };
    let after = body[close + 1..].trim_start();
    if !(after.is_empty() || after.starts_with('#')) {
        return Err("unexpected text after the closing quote");
    }
    Ok(value)
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
        for (text, line, reason) in [
            (
                "MOERA_MODEL=ok\n\nthis is not an assignment\n",
                3,
                "KEY=VALUE",
            ),
            ("# c\n=value\n", 2, "KEY"),
            ("MY-KEY=value\n", 1, "KEY"),
            (
                "MOERA_API_KEY=\"sk-unterminated\n",
                1,
                "unterminated double quote",
            ),
            (
                "MOERA_API_KEY='sk-unterminated\n",
                1,
                "unterminated single quote",
            ),
            ("MOERA_MODEL=\"a\" b\n", 1, "after the closing quote"),
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
        let s = Settings::load(
            None,
            vars(&[
                ("MOERA_API_KEY", "sk-live-0123456789"),
                ("MOERA_REDIS_URL", "redis://:hunter2@cache.internal:6379/0"),
            ]),
        )
        .unwrap();
        for text in [format!("{s:?}"), format!("{s:#?}")] {
            assert!(!text.contains("sk-live"), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("***"), "{text}");
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
