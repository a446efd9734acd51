//! `/api/v1/users`: register, read, update.

use actix_web::{HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::extract::{Authenticated, if_match};
use super::{AppState, bad, tagged};
use crate::actors::auth::{HashPassword, PasswordChanged};
use crate::actors::shard::{GetUser, UserChange};
use crate::model::{CreatedUser, NewUser, Profile, UserRow, UserUpdate, UserView};
use crate::placement::{new_owned_id, new_root_id};
use crate::problem::{ApiError, Problem};
use crate::validate;
use crate::vclock::VectorClock;

/// Checks and normalises a registration.
pub fn validated_new(new: NewUser) -> Result<NewUser, ApiError> {
    let NewUser { username, email, password } = new;
    let username = validate::username(&username).map_err(bad)?;
    let email = validate::email(&email).map_err(bad)?;
    validate::password(&password).map_err(bad)?;
    Ok(NewUser { username, email, password })
}

/// Checks and normalises an update; omitted fields stay omitted (kept).
pub fn validated_update(update: UserUpdate) -> Result<UserUpdate, ApiError> {
    let UserUpdate { username, email, password } = update;
    if username.is_none() && email.is_none() && password.is_none() {
        return Err(bad("give at least one of username, email, password".into()));
    }
    let username = username.map(|u| validate::username(&u)).transpose().map_err(bad)?;
    let email = email.map(|e| validate::email(&e)).transpose().map_err(bad)?;
    if let Some(p) = &password {
        validate::password(p).map_err(bad)?;
    }
    Ok(UserUpdate { username, email, password })
}

/// Register a user; their empty profile is created in the same transaction.
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = NewUser,
    responses(
        (status = 201, description = "Created; `Location` names the user", body = UserView),
        (status = 400, body = Problem), (status = 409, description = "Username or email taken", body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem), (status = 503, body = Problem)))]
pub async fn create(state: web::Data<AppState>, body: web::Json<NewUser>) -> Result<HttpResponse, ApiError> {
    let NewUser { username, email, password } = validated_new(body.into_inner())?;
    let password_hash = state.auth.send(HashPassword(password)).await??;
    let now = crate::model::now();
    let id = new_root_id();
    let profile_id = new_owned_id(&id);
    let user = UserRow {
        id,
        username,
        email,
        password_hash,
        profile_id,
        created_at: now,
        updated_at: now,
        password_changed_at: now,
        vclock: VectorClock::new(),
    };
    let profile = Profile {
        id: profile_id,
        user_id: id,
        name: String::new(),
        bio: String::new(),
        skills: Vec::new(),
        interests: Vec::new(),
        created_at: now,
        updated_at: now,
        vclock: VectorClock::new(),
    };
    let user = state.shards.create_user(user, profile).await?;
    slog_scope::info!("user registered"; "user_id" => %user.id);
    Ok(tagged(HttpResponse::Created(), &user.vclock)
        .insert_header(("Location", format!("/api/v1/users/{}", user.id)))
        .json(CreatedUser { user: user.view(Some(user.id)) }))
}

/// Read a user. The email is shown only to the user themself.
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses((status = 200, body = UserView, headers(("ETag" = String))), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn get(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let user = state.shards.ask_for(&id, GetUser { id }).await?;
    Ok(tagged(HttpResponse::Ok(), &user.vclock).json(user.view(Some(caller.0.user_id))))
}

/// Change your username, email and/or password. Omitted fields are kept. After a password
/// change every token issued before it (this request's too) is refused: log in again.
#[utoipa::path(put, path = "/api/v1/users/{id}", tag = "users", security(("bearer" = [])), request_body = UserUpdate,
    params(("id" = Uuid, Path, description = "User id"), ("If-Match" = Option<String>, Header, description = "ETag from a GET")),
    responses((status = 200, body = UserView), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 412, body = Problem), (status = 503, body = Problem)))]
pub async fn update(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<Uuid>,
    req: HttpRequest,
    body: web::Json<UserUpdate>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    if caller.0.user_id != id {
        return Err(ApiError::Forbidden("you may change only your own user".into()));
    }
    let if_match = if_match(&req)?;
    let UserUpdate { username, email, password } = validated_update(body.into_inner())?;
    let password_hash = match password {
        Some(p) => Some(state.auth.send(HashPassword(p)).await??),
        None => None,
    };
    let password_changed = password_hash.is_some();
    let user = state.shards.update_user(id, if_match, UserChange { username, email, password_hash }).await?;
    if password_changed {
        // Answer only once older tokens are refused, so the client can rely on it.
        state.auth.send(PasswordChanged { user_id: id, at: user.password_changed_at }).await?;
    }
    Ok(tagged(HttpResponse::Ok(), &user.vclock).json(user.view(Some(id))))
}
