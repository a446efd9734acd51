//! Request extractors shared by the handlers: the authenticated caller and `If-Match`.
//!
//! Authentication is a bearer token in `Authorization`, checked with the `TokenVerifier`
//! the AuthActor publishes. The token itself is never logged or echoed back.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::future::{Ready, ready};

use super::AppState;
use crate::actors::auth::Caller;
use crate::problem::ApiError;

/// The caller of an endpoint that needs a valid access token.
pub struct Authenticated(pub Caller);

/// The bearer token of a request, if it carries one.
pub fn bearer_token(req: &HttpRequest) -> Option<String> {
    let value = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim().to_owned())
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    // Checking a token needs no I/O, so the extractor is ready at once (nothing boxed).
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<Authenticated, ApiError> {
    let state =
        req.app_data::<web::Data<AppState>>().ok_or_else(|| ApiError::Internal("application state missing".into()))?;
    let token = bearer_token(req)
        .ok_or_else(|| ApiError::Unauthorized("an access token is required (Authorization: Bearer <token>)".into()))?;
    Ok(Authenticated(state.tokens.verify(&token)?))
}

/// The raw `If-Match` header, if present (compared by the shard under the row lock).
pub fn if_match(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    match req.headers().get(actix_web::http::header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ApiError::BadRequest("If-Match must be ASCII entity tags".into())),
    }
}
