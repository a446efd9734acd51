//! Request extractors shared by the handlers: the authenticated caller and `If-Match`.
//!
//! Authentication is a bearer token in `Authorization`, verified by the AuthActor. The
//! token itself is never logged or echoed back.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::future::LocalBoxFuture;

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

/// Verifies a token against the AuthActor's published verifier (no actor round trip).
pub async fn verify(state: &AppState, token: String) -> Result<Caller, ApiError> {
    state.tokens.verify(&token)
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = bearer_token(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::Internal("application state missing".into()))?;
            let token = token.ok_or_else(|| {
                ApiError::Unauthorized("an access token is required (Authorization: Bearer <token>)".into())
            })?;
            verify(&state, token).await.map(Authenticated)
        })
    }
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
