//! Errors that know their HTTP status, rendered as RFC 9457 problem details.
//!
//! Every error a client can see goes through `ApiError`, whose one `ResponseError` impl
//! writes an `application/problem+json` body. Handlers never format an error by hand.
//! Messages must never carry a secret (password, token, hash, key).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::actors::auth::AuthError;
use crate::actors::keys::KeyError;
use crate::actors::peer::PeerError;
use crate::actors::peer::event_loop::LookupError;
pub use crate::actors::shard::StoreError;

/// An RFC 9457 problem details body.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type (`about:blank` when the status says it all).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

/// Every error a handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Too many attempts; the client may retry after this many seconds.
    #[error("{0}")]
    TooManyRequests(String, u64),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid-request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PreconditionFailed(_) => "precondition-failed",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::UnsupportedMediaType(_) => "unsupported-media-type",
            ApiError::TooManyRequests(..) => "too-many-requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The problem body for this error.
    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        Problem {
            kind: format!("urn:cosmicsync:problem:{}", self.kind()),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(cause) = self {
            slog_scope::error!("internal error"; "cause" => cause.as_str());
        }
        let mut response = HttpResponse::build(self.status_code());
        response.content_type("application/problem+json");
        match self {
            ApiError::Unauthorized(_) => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            ApiError::Unavailable(_) => {
                response.insert_header(("Retry-After", "5"));
            }
            ApiError::TooManyRequests(_, secs) => {
                response.insert_header(("Retry-After", secs.max(&1).to_string()));
            }
            _ => {}
        }
        response.json(self.problem())
    }
}

// One `From` per error type of the layers below: the only place their errors become
// statuses and client messages. An internal cause goes to the log (`ApiError::Internal`),
// never to the client.

fn internal(e: &(dyn std::error::Error + 'static)) -> ApiError {
    ApiError::Internal(crate::errors::chain(e))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(m) => ApiError::Conflict(m),
            StoreError::PreconditionFailed => ApiError::PreconditionFailed(e.to_string()),
            StoreError::Forbidden(_) => ApiError::Forbidden(e.to_string()),
            StoreError::Unavailable(shard) => {
                ApiError::Unavailable(format!("shard {shard} is unavailable; the node is reconnecting, retry shortly"))
            }
            // Every other failure is the node's or its data's, not the request's. Its text,
            // not its whole chain: a PostgreSQL error's DETAIL may quote a row.
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized(why) => ApiError::Unauthorized(why.into()),
            AuthError::RevocationsNotLoaded => ApiError::Unavailable(e.to_string()),
            AuthError::TooManyAttempts { retry_after } => ApiError::TooManyRequests(
                e.to_string(),
                retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0),
            ),
            AuthError::Store(e) => e.into(),
            AuthError::Hashing(_) | AuthError::Task(_) | AuthError::GateClosed | AuthError::Signing(_) => internal(&e),
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Store(e) => e.into(),
            KeyError::KeyFile(_) => internal(&e),
        }
    }
}

impl From<PeerError> for ApiError {
    fn from(e: PeerError) -> Self {
        match e {
            PeerError::Lookup(LookupError::NotFound(_)) => ApiError::NotFound(e.to_string()),
            PeerError::Lookup(LookupError::OwnId) => ApiError::BadRequest(e.to_string()),
            PeerError::Lookup(LookupError::NoPeers) | PeerError::Unavailable | PeerError::Timeout => {
                ApiError::Unavailable(e.to_string())
            }
            PeerError::Start(_) | PeerError::Sync(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Unavailable(format!("a node component is restarting ({e}); retry shortly"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use actix_web::ResponseError;

    use super::*;

    fn seen(e: impl Into<ApiError>) -> (u16, String) {
        let e = e.into();
        (e.status_code().as_u16(), e.to_string())
    }

    #[test]
    fn errors_of_the_layers_below_keep_their_statuses_and_messages() {
        let unauthorized = seen(AuthError::Unauthorized("the access token has been revoked"));
        assert_eq!(unauthorized, (401, "the access token has been revoked".into()));
        assert_eq!(seen(AuthError::RevocationsNotLoaded).0, 503);
        let limited: ApiError = AuthError::TooManyAttempts { retry_after: Duration::from_millis(1_200) }.into();
        assert!(matches!(limited, ApiError::TooManyRequests(_, 2)), "{limited:?}");
        assert_eq!(seen(AuthError::Store(StoreError::NotFound("user"))), (404, "user not found".into()));
        assert_eq!(seen(StoreError::Corrupt("unknown op".into())), (500, "internal error".into()));
        assert_eq!(seen(KeyError::KeyFile(std::io::Error::other("disk full"))), (500, "internal error".into()));
        assert_eq!(seen(PeerError::Lookup(LookupError::OwnId)).0, 400);
    }
}
