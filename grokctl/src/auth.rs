//! The bearer token `grokctl` sends to a cluster's client APIs (see `grok_proto::auth`).

use std::sync::OnceLock;

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
    *grok_shared::sync::lock(&CONFIG_TOKEN) = t;
}

/// Wraps a message in a request carrying the client token, if any.
pub fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let tok = CLIENT_TOKEN.get_or_init(|| {
        std::env::var("GROK_API_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
    });
    let config = grok_shared::sync::lock(&CONFIG_TOKEN).clone();
    if let Some(t) = tok.as_ref().or(config.as_ref()) {
        if let Ok(v) = format!("Bearer {}", t.trim()).parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}
