//! Bearer-token authentication of the client APIs (gRPC `Inference` and `Admin`, HTTP `/v1/*`).
//! The token comes from `--api-token-file` or `GROK_API_TOKEN`, never from a command-line value
//! (which `ps` would show), and never appears in logs or errors.

#[derive(Debug, thiserror::Error)]
#[error("cannot read the token file {path}: {source}")]
pub struct TokenFileError {
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

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
pub fn load_token(file: Option<&std::path::Path>) -> Result<Option<String>, TokenFileError> {
    let t = match file {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|source| TokenFileError {
                path: p.to_path_buf(),
                source,
            })?
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
