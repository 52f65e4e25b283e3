//! Bearer-token authentication of the client APIs (gRPC `Inference` and `Admin`, HTTP `/v1/*`).
//! The token comes from `--api-token-file` or `GROK_API_TOKEN`, never from a command-line value
//! (which `ps` would show), and never appears in logs or errors.

use std::sync::OnceLock;

/// Compares `Authorization: Bearer <token>` against the expected token in constant time.
pub fn bearer_matches(expected: &str, header: Option<&str>) -> bool {
    let Some(h) = header else { return false };
    let Some(got) = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
    else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), got.trim().as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads the token: the file's first line, else `GROK_API_TOKEN`; empty means none.
pub fn load_token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let t = match file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| anyhow::anyhow!("cannot read the token file {}: {e}", p.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var("GROK_API_TOKEN")
            .unwrap_or_default()
            .trim()
            .to_string(),
    };
    Ok((!t.is_empty()).then_some(t))
}

static CLIENT_TOKEN: OnceLock<Option<String>> = OnceLock::new();
/// A token from a cluster config file (`[coordinator] api_token_file`), used when neither
/// `--token-file` nor GROK_API_TOKEN gives one.
static CONFIG_TOKEN: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Sets the token `grokctl` sends to a cluster (once, at start-up).
pub fn set_client_token(t: Option<String>) {
    let _ = CLIENT_TOKEN.set(t);
}

/// The token of the cluster a config file describes (see `CONFIG_TOKEN`).
pub fn set_config_token(t: Option<String>) {
    *CONFIG_TOKEN.lock().unwrap_or_else(|p| p.into_inner()) = t;
}

/// Wraps a message in a request carrying the client token, if any.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let tok = CLIENT_TOKEN.get_or_init(|| {
        std::env::var("GROK_API_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
    });
    let config = CONFIG_TOKEN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(t) = tok.as_ref().or(config.as_ref()) {
        if let Ok(v) = format!("Bearer {}", t.trim()).parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_checks() {
        assert!(bearer_matches("s3cret", Some("Bearer s3cret")));
        assert!(!bearer_matches("s3cret", Some("Bearer s3creT")));
        assert!(!bearer_matches("s3cret", Some("s3cret")));
        assert!(!bearer_matches("s3cret", None));
        assert!(!bearer_matches("s3cret", Some("Bearer s3cret2")));
    }
}
