//! Configuration: environment variables (optionally from `.env`), parsed once at start-up into
//! typed values. A bad value stops the process with one line naming the variable.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;
use secrecy::SecretString;
use url::Url;

/// Why the configuration could not be read: always names the variable and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}: {expected}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub expected: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `DATABASE_URL`: `mysql://user:password@host:port/database`; the database is created if missing.
    pub database_url: Url,
    /// `SECRET_KEY`: signs tokens and encrypts the Dify key; at least 32 bytes. When unset a random
    /// key is generated once and kept in the database.
    pub secret_key: Option<SecretString>,
    /// `DIFY_API_URL`: the Dify Service API base, with or without `/v1`; an admin may override it.
    pub dify_api_url: Url,
    /// `HOST`
    pub host: IpAddr,
    /// `PORT`
    pub port: u16,
    /// `CORS_ORIGINS`: comma-separated browser origins allowed to call the API.
    pub cors_origins: Vec<HeaderValue>,
    /// `JWT_EXPIRE_MINUTES`: token lifetime.
    pub jwt_expire: Duration,
    /// `LOG_FORMAT`: `pretty` or `json` (`RUST_LOG` is read by the log filter itself).
    pub log_format: LogFormat,
    /// Not configurable from the environment: connections per process for interactive work.
    pub db_pool_size: usize,
    /// Connections per process for background writes (write-behind batches, final writes).
    pub writer_pool_size: usize,
    /// How often a streaming answer is written to MySQL while it grows.
    pub flush_interval: Duration,
    /// A STREAMING message whose last flush is older than this belongs to a dead process.
    pub stale_stream_after: Duration,
    /// `GATEWAY_LEASE_SECONDS`: how long a gateway process's lease lasts without renewal; when it
    /// expires, other gateways mark its live answers INTERRUPTED.
    pub gateway_lease: Duration,
    /// Longest silence tolerated on a Dify stream; longer than Dify's 10 s ping interval.
    pub dify_read_timeout: Duration,
    /// A WebSocket that sends no `connection_init` within this time is closed (4408).
    pub ws_init_timeout: Duration,
    /// How long a client may take to send a request's headers, and how long a kept-alive
    /// connection may sit idle between requests.
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// How often WebSockets are pinged; one that answers nothing for two intervals is closed.
    pub ws_keepalive: Duration,
    /// The longest a query, a mutation or a chat's start may wait (for a frozen database, say)
    /// before it is answered `SERVICE_UNAVAILABLE`.
    pub operation_timeout: Duration,
    /// `RESUME_BUFFER_BYTES`: the events kept per answer for subscribers that resume or read
    /// slowly; beyond it the oldest are folded into a `ChatSnapshot`.
    pub resume_buffer_bytes: usize,
    /// How long the Redis stream of an answer mirrored for another gateway stays after the
    /// answer ended.
    pub resume_grace: Duration,
    /// `AUTH_ATTEMPTS_PER_MINUTE_PER_ADDRESS`: registrations and sign-ins per client address.
    pub auth_attempts_per_minute_per_address: u32,
    /// `TRUST_FORWARDED_FOR`: take the client address from the last `X-Forwarded-For` entry
    /// (set it only behind a reverse proxy that appends it).
    pub trust_forwarded_for: bool,
    /// `REDIS_URL`: Redis shared by several gateways (limits, stops, admin changes); none for
    /// one gateway on its own.
    pub redis_url: Option<SecretString>,
    /// `REDIS_PREFIX`: the prefix of every Redis key and channel of this deployment.
    pub redis_prefix: String,
    /// `CHAT_TURNS_PER_MINUTE`: chat turns per user per minute.
    pub chat_turns_per_minute: u32,
    /// `MAX_ACTIVE_ANSWERS_PER_USER`: answers one user may have streaming at once.
    pub max_active_answers_per_user: u32,
    /// `MAX_SUBSCRIPTIONS_PER_CONNECTION`: operations running at once on one WebSocket.
    pub max_subscriptions_per_connection: usize,
    /// `DEFAULT_TOKEN_QUOTA`: tokens per user per calendar month unless an admin set a quota;
    /// `None` is unlimited.
    pub default_token_quota: Option<u64>,
    /// `MAX_ANSWER_BYTES`: the longest answer stored; a longer one is stopped at Dify.
    pub max_answer_bytes: usize,
    /// `MAX_CONNECTIONS`: open client connections (HTTP and WebSocket) per process.
    pub max_connections: usize,
    /// `UPLOAD_MAX_BYTES`: the largest file accepted for an upload.
    pub upload_max_bytes: u64,
    /// `UPLOADS_PER_MINUTE`: uploads per user per minute.
    pub uploads_per_minute: u32,
}

/// The largest `MAX_ANSWER_BYTES`: an answer is one MEDIUMTEXT value in one statement.
pub const MAX_ANSWER_BYTES_CEILING: usize = 15 << 20;

/// How long a mirrored answer's Redis stream outlives the answer.
pub const RESUME_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_DATABASE_URL: &str = "mysql://root@127.0.0.1:3306/rechat";
pub const DEFAULT_DIFY_API_URL: &str = "https://api.dify.ai/v1";

impl Config {
    /// Reads the process environment (after loading `.env` if there is one).
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parses configuration from any variable source; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let database_url = parse_database_url(
            get("DATABASE_URL")
                .as_deref()
                .unwrap_or(DEFAULT_DATABASE_URL),
        )?;
        let secret_key = match get("SECRET_KEY") {
            Some(key) if key.len() < 32 => {
                return Err(ConfigError {
                    variable: "SECRET_KEY",
                    expected: format!("at least 32 bytes, got {}", key.len()),
                });
            }
            other => other.map(SecretString::from),
        };
        let dify_api_url = parse_http_url(
            "DIFY_API_URL",
            get("DIFY_API_URL")
                .as_deref()
                .unwrap_or(DEFAULT_DIFY_API_URL),
        )?;
        let host = parse(
            "HOST",
            get("HOST"),
            "0.0.0.0".parse().ok(),
            "an IP address such as 0.0.0.0",
        )?;
        let port = parse("PORT", get("PORT"), Some(8000), "a port number 1-65535")?;
        if port == 0 {
            return Err(ConfigError {
                variable: "PORT",
                expected: "a port number 1-65535".into(),
            });
        }
        let cors_origins = get("CORS_ORIGINS")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(|origin| {
                        let bad = || ConfigError {
                            variable: "CORS_ORIGINS",
                            expected: format!("comma-separated origins like https://app.example.com, got {origin:?}"),
                        };
                        let url = Url::parse(origin).map_err(|_| bad())?;
                        if !matches!(url.scheme(), "http" | "https") || url.path() != "/" {
                            return Err(bad());
                        }
                        HeaderValue::from_str(origin.trim_end_matches('/')).map_err(|_| bad())
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let minutes: u64 = parse(
            "JWT_EXPIRE_MINUTES",
            get("JWT_EXPIRE_MINUTES"),
            Some(10080),
            "a positive number of minutes",
        )?;
        if minutes == 0 {
            return Err(ConfigError {
                variable: "JWT_EXPIRE_MINUTES",
                expected: "a positive number of minutes".into(),
            });
        }
        let log_format = match get("LOG_FORMAT")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(_) => {
                return Err(ConfigError {
                    variable: "LOG_FORMAT",
                    expected: "pretty or json".into(),
                });
            }
        };
        let resume_buffer_bytes: usize = parse(
            "RESUME_BUFFER_BYTES",
            get("RESUME_BUFFER_BYTES"),
            Some(256 * 1024),
            "a number of bytes, at least 16384",
        )?;
        if resume_buffer_bytes < 16_384 {
            return Err(ConfigError {
                variable: "RESUME_BUFFER_BYTES",
                expected: format!("a number of bytes, at least 16384, got {resume_buffer_bytes}"),
            });
        }
        let limit = |variable: &'static str, default: u64| -> Result<u64, ConfigError> {
            let value: u64 = parse(variable, get(variable), Some(default), "a positive integer")?;
            if value == 0 {
                return Err(ConfigError {
                    variable,
                    expected: "a positive integer, got \"0\"".into(),
                });
            }
            Ok(value)
        };
        let as_u32 = |value: u64| u32::try_from(value).unwrap_or(u32::MAX);
        let redis_url = match get("REDIS_URL").filter(|url| !url.trim().is_empty()) {
            None => None,
            Some(url) if redis::Client::open(url.trim()).is_ok() => {
                Some(SecretString::from(url.trim().to_owned()))
            }
            Some(_) => {
                return Err(ConfigError {
                    variable: "REDIS_URL",
                    expected: "a Redis URL such as redis://127.0.0.1:6379/0".into(),
                });
            }
        };
        let redis_prefix = get("REDIS_PREFIX")
            .map(|prefix| prefix.trim().to_owned())
            .unwrap_or_else(|| "rechat".into());
        if redis_prefix.is_empty() || redis_prefix.contains(char::is_whitespace) {
            return Err(ConfigError {
                variable: "REDIS_PREFIX",
                expected: "a non-empty prefix without spaces".into(),
            });
        }
        let trust_forwarded_for = match get("TRUST_FORWARDED_FOR")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(other) => {
                return Err(ConfigError {
                    variable: "TRUST_FORWARDED_FOR",
                    expected: format!("true or false, got {other:?}"),
                });
            }
        };
        let default_token_quota = match get("DEFAULT_TOKEN_QUOTA") {
            None => None,
            Some(_) => Some(limit("DEFAULT_TOKEN_QUOTA", 0)?),
        };
        let max_answer_bytes = limit("MAX_ANSWER_BYTES", 4 << 20)? as usize;
        if max_answer_bytes > MAX_ANSWER_BYTES_CEILING {
            return Err(ConfigError {
                variable: "MAX_ANSWER_BYTES",
                expected: format!(
                    "at most {MAX_ANSWER_BYTES_CEILING} bytes (a MEDIUMTEXT column, within \
                     MySQL's default 16 MiB packet), got {max_answer_bytes}"
                ),
            });
        }
        Ok(Self {
            auth_attempts_per_minute_per_address: as_u32(limit(
                "AUTH_ATTEMPTS_PER_MINUTE_PER_ADDRESS",
                30,
            )?),
            trust_forwarded_for,
            redis_url,
            redis_prefix,
            chat_turns_per_minute: as_u32(limit("CHAT_TURNS_PER_MINUTE", 20)?),
            max_active_answers_per_user: as_u32(limit("MAX_ACTIVE_ANSWERS_PER_USER", 3)?),
            max_subscriptions_per_connection: limit("MAX_SUBSCRIPTIONS_PER_CONNECTION", 8)?
                as usize,
            default_token_quota,
            max_answer_bytes,
            max_connections: limit("MAX_CONNECTIONS", 10_000)? as usize,
            upload_max_bytes: limit("UPLOAD_MAX_BYTES", 15 << 20)?,
            uploads_per_minute: as_u32(limit("UPLOADS_PER_MINUTE", 20)?),
            database_url,
            secret_key,
            dify_api_url,
            host,
            port,
            cors_origins,
            jwt_expire: Duration::from_secs(minutes * 60),
            log_format,
            db_pool_size: 16,
            writer_pool_size: 8,
            flush_interval: Duration::from_secs(1),
            stale_stream_after: Duration::from_secs(120),
            gateway_lease: Duration::from_secs(limit("GATEWAY_LEASE_SECONDS", 20)?),
            dify_read_timeout: Duration::from_secs(60),
            ws_init_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            ws_keepalive: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(30),
            resume_buffer_bytes,
            resume_grace: RESUME_GRACE,
        })
    }

    /// Configuration for tests: never reads the process environment.
    pub fn for_tests(database_url: &str, dify_api_url: &str) -> Self {
        Self {
            database_url: parse_database_url(database_url).expect("test database url"),
            secret_key: Some(SecretString::from(
                "test-secret-key-that-is-long-enough-0123456789",
            )),
            dify_api_url: parse_http_url("DIFY_API_URL", dify_api_url).expect("test dify url"),
            host: [127, 0, 0, 1].into(),
            port: 0,
            cors_origins: vec![HeaderValue::from_static("https://app.example.com")],
            jwt_expire: Duration::from_secs(3600),
            log_format: LogFormat::Pretty,
            db_pool_size: 4,
            writer_pool_size: 2,
            flush_interval: Duration::from_millis(200),
            stale_stream_after: Duration::from_secs(120),
            gateway_lease: Duration::from_secs(20),
            dify_read_timeout: Duration::from_secs(3),
            ws_init_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(2),
            ws_keepalive: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(2),
            resume_buffer_bytes: 256 * 1024,
            resume_grace: RESUME_GRACE,
            auth_attempts_per_minute_per_address: 30,
            trust_forwarded_for: false,
            redis_url: None,
            redis_prefix: "rechat".into(),
            chat_turns_per_minute: 20,
            max_active_answers_per_user: 3,
            max_subscriptions_per_connection: 8,
            default_token_quota: None,
            max_answer_bytes: 4 << 20,
            max_connections: 10_000,
            upload_max_bytes: 15 << 20,
            uploads_per_minute: 20,
        }
    }

    /// The database name from `DATABASE_URL`.
    pub fn database_name(&self) -> &str {
        self.database_url.path().trim_start_matches('/')
    }

    /// `DATABASE_URL` without the database, to create it.
    pub fn server_url(&self) -> Url {
        let mut url = self.database_url.clone();
        url.set_path("");
        url
    }
}

fn parse<T: std::str::FromStr>(
    variable: &'static str,
    value: Option<String>,
    default: Option<T>,
    expected: &str,
) -> Result<T, ConfigError> {
    let error = |got: &str| ConfigError {
        variable,
        expected: format!("{expected}, got {got:?}"),
    };
    match value {
        Some(v) => v.parse().map_err(|_| error(&v)),
        None => default.ok_or_else(|| error("")),
    }
}

fn parse_database_url(value: &str) -> Result<Url, ConfigError> {
    let error = |why: &str| ConfigError {
        variable: "DATABASE_URL",
        expected: format!("mysql://user[:password]@host[:port]/database ({why})"),
    };
    let url = Url::parse(value).map_err(|_| error("not a URL"))?;
    if url.scheme() != "mysql" {
        return Err(error("the scheme must be mysql"));
    }
    let name = url.path().trim_start_matches('/');
    if name.is_empty() {
        return Err(error("the database name is missing"));
    }
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
    {
        return Err(error(
            "the database name may use only letters, digits, _ and $",
        ));
    }
    Ok(url)
}

/// Parses an http(s) URL and normalises a Dify base to end in `/v1`.
pub fn parse_http_url(variable: &'static str, value: &str) -> Result<Url, ConfigError> {
    let error = || ConfigError {
        variable,
        expected: format!("an http(s) URL such as {DEFAULT_DIFY_API_URL}, got {value:?}"),
    };
    let url = Url::parse(value.trim()).map_err(|_| error())?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not echoed: it holds a password.
        return Err(ConfigError {
            variable,
            expected: "an http(s) URL without user:password (Dify authenticates with the API key)"
                .into(),
        });
    }
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(error());
    }
    Ok(crate::dify::normalize_base_url(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = config(&[]).unwrap();
        assert_eq!(c.database_name(), "rechat");
        assert_eq!(c.server_url().as_str(), "mysql://root@127.0.0.1:3306");
        assert_eq!(c.dify_api_url.as_str(), "https://api.dify.ai/v1");
        assert_eq!(c.port, 8000);
        assert_eq!(c.jwt_expire, Duration::from_secs(10080 * 60));
        assert!(c.secret_key.is_none());
        assert!(c.cors_origins.is_empty());
        assert_eq!(c.auth_attempts_per_minute_per_address, 30);
        assert!(!c.trust_forwarded_for);
        assert_eq!(c.chat_turns_per_minute, 20);
        assert_eq!(c.max_active_answers_per_user, 3);
        assert_eq!(c.max_subscriptions_per_connection, 8);
        assert_eq!(c.default_token_quota, None);
        assert_eq!(c.max_answer_bytes, 4 << 20);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.upload_max_bytes, 15 << 20);
        assert_eq!(c.uploads_per_minute, 20);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (var, value) in [
            ("DATABASE_URL", "postgres://x/y"),
            ("DATABASE_URL", "mysql://root@localhost"),
            ("DATABASE_URL", "mysql://root@localhost/bad-name"),
            ("SECRET_KEY", "short"),
            ("DIFY_API_URL", "ftp://dify"),
            ("HOST", "not-an-ip"),
            ("PORT", "70000"),
            ("PORT", "0"),
            ("CORS_ORIGINS", "app.example.com"),
            ("JWT_EXPIRE_MINUTES", "-5"),
            ("LOG_FORMAT", "xml"),
            ("RESUME_BUFFER_BYTES", "1000"),
            ("RESUME_BUFFER_BYTES", "lots"),
            ("AUTH_ATTEMPTS_PER_MINUTE_PER_ADDRESS", "0"),
            ("TRUST_FORWARDED_FOR", "maybe"),
            ("REDIS_URL", "http://127.0.0.1:6379"),
            ("REDIS_PREFIX", "two words"),
            ("CHAT_TURNS_PER_MINUTE", "-1"),
            ("MAX_ACTIVE_ANSWERS_PER_USER", "0"),
            ("MAX_SUBSCRIPTIONS_PER_CONNECTION", "x"),
            ("DEFAULT_TOKEN_QUOTA", "0"),
            ("MAX_ANSWER_BYTES", "big"),
            ("MAX_ANSWER_BYTES", "16777216"),
            ("MAX_CONNECTIONS", "0"),
            ("UPLOAD_MAX_BYTES", "0"),
            ("UPLOADS_PER_MINUTE", "many"),
        ] {
            let err = config(&[(var, value)]).unwrap_err();
            assert_eq!(err.variable, var, "{value}");
            assert!(err.to_string().starts_with(&format!("invalid {var}: ")));
        }
    }

    #[test]
    fn dify_url_accepts_with_and_without_v1() {
        for value in [
            "http://dify.local",
            "http://dify.local/",
            "http://dify.local/v1",
            "http://dify.local/v1/",
        ] {
            let c = config(&[("DIFY_API_URL", value)]).unwrap();
            assert_eq!(c.dify_api_url.as_str(), "http://dify.local/v1");
        }
    }

    #[test]
    fn cors_origins_are_split() {
        let c = config(&[(
            "CORS_ORIGINS",
            "https://a.example.com, http://localhost:3000",
        )])
        .unwrap();
        assert_eq!(c.cors_origins.len(), 2);
    }
}
