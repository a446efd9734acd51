//! `/api/v1/auth`: log in (username + password → access token) and log out (revoke it).

use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::extract::Authenticated;
use crate::actors::auth::{Login, Revoke};
use crate::model::{LoginRequest, TokenResponse};
use crate::problem::{ApiError, Problem};

/// Log in. A wrong username and a wrong password get the same answer. Failed logins are
/// limited per client address and per username: past the limit, 429 with `Retry-After`.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 400, body = Problem),
        (status = 401, description = "Invalid username or password", body = Problem),
        (status = 429, description = "Too many failed logins; see Retry-After", body = Problem),
        (status = 503, body = Problem)))]
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    precheck(&body)?;
    let LoginRequest { username, password } = body;
    // The TCP peer: forwarded-for headers are not trusted (the node faces clients itself).
    let client = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let token = state.auth.send(Login { username, password, client }).await??;
    Ok(HttpResponse::Ok().insert_header(("Cache-Control", "no-store")).json(token))
}

/// Refuses, before any work, a login that cannot match an account: a name registration
/// would refuse (too long, a NUL PostgreSQL cannot take, ...) or an oversized password.
pub fn precheck(login: &LoginRequest) -> Result<(), ApiError> {
    if crate::validate::username(&login.username).is_err() || login.password.len() > 1024 {
        return Err(ApiError::Unauthorized("invalid username or password".into()));
    }
    Ok(())
}

/// Log out: the token used for this request is revoked, also across restarts.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "Revoked"), (status = 401, body = Problem), (status = 503, body = Problem)))]
pub async fn logout(state: web::Data<AppState>, caller: Authenticated) -> Result<HttpResponse, ApiError> {
    state.auth.send(Revoke(caller.0)).await??;
    Ok(HttpResponse::NoContent().finish())
}
