//! API key authentication: `Authorization: Bearer KEY`, or `?api_key=KEY` on WebSockets
//! (browsers cannot set headers on them).

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

/// The configured key, kept as its SHA-256 digest.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Compares digests in constant time: hashing first makes the comparison independent
    /// of the lengths, and the XOR fold of every byte independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        let candidate: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        candidate
            .iter()
            .zip(&self.digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[derive(Deserialize)]
struct KeyQuery {
    api_key: Option<String>,
}

/// The key a request presents, if any.
fn presented(request: &Request) -> Option<String> {
    if let Some(key) = bearer(request.headers()) {
        return Some(key);
    }
    if request.uri().path().starts_with("/ws/") {
        return Query::<KeyQuery>::try_from_uri(request.uri())
            .ok()
            .and_then(|query| query.0.api_key);
    }
    None
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// Refuses requests without the configured key (when one is configured).
pub async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = state.api_key() else {
        return next.run(request).await;
    };
    match presented(&request) {
        Some(candidate) if key.matches(&candidate) => next.run(request).await,
        Some(_) => ApiError::unauthorized("invalid API key").into_response(),
        None => ApiError::unauthorized(
            "missing API key: send it as `Authorization: Bearer KEY` (or `?api_key=KEY` on a WebSocket)",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_themselves() {
        let key = ApiKey::new("secret");
        assert!(key.matches("secret"));
        assert!(!key.matches("secreT"));
        assert!(!key.matches(""));
        assert!(!key.matches("secret "));
        assert_eq!(format!("{key:?}"), "ApiKey(..)");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers).as_deref(), Some("abc"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
