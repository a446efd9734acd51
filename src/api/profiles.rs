//! `/api/v1/profiles`: read and update (owner only).

use actix_web::{HttpRequest, HttpResponse, web};
use uuid::Uuid;

use super::extract::{Authenticated, if_match};
use super::{AppState, bad, tagged};
use crate::actors::shard::{GetProfile, UpdateProfile};
use crate::model::{Profile, ProfileUpdate};
use crate::problem::{ApiError, Problem};
use crate::validate::{self, limits};

/// Read a profile.
#[utoipa::path(get, path = "/api/v1/profiles/{id}", tag = "profiles", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Profile id")),
    responses((status = 200, body = Profile, headers(("ETag" = String))), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn get(
    state: web::Data<AppState>,
    _caller: Authenticated,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let profile = state.shards.ask_for(&id, GetProfile { id }).await?;
    Ok(tagged(HttpResponse::Ok(), &profile.vclock).json(profile))
}

/// Checks and normalises an update; omitted fields stay omitted (kept).
pub fn validated(update: ProfileUpdate) -> Result<ProfileUpdate, ApiError> {
    let ProfileUpdate { name, bio, skills, interests } = update;
    if name.is_none() && bio.is_none() && skills.is_none() && interests.is_none() {
        return Err(bad("give at least one of name, bio, skills, interests".into()));
    }
    Ok(ProfileUpdate {
        name: name.map(|n| validate::line("name", &n, 0, limits::NAME_MAX)).transpose().map_err(bad)?,
        bio: bio.map(|b| validate::text("bio", &b, limits::BIO_MAX)).transpose().map_err(bad)?,
        skills: skills.map(|s| validate::labels("skills", &s)).transpose().map_err(bad)?,
        interests: interests.map(|i| validate::labels("interests", &i)).transpose().map_err(bad)?,
    })
}

/// Update your profile. Omitted fields are kept; send `""` or `[]` to clear one.
#[utoipa::path(put, path = "/api/v1/profiles/{id}", tag = "profiles", security(("bearer" = [])), request_body = ProfileUpdate,
    params(("id" = Uuid, Path, description = "Profile id"), ("If-Match" = Option<String>, Header, description = "ETag from a GET")),
    responses((status = 200, body = Profile), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 412, body = Problem),
        (status = 503, body = Problem)))]
pub async fn update(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<Uuid>,
    req: HttpRequest,
    body: web::Json<ProfileUpdate>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let update = validated(body.into_inner())?;
    let if_match = if_match(&req)?;
    let profile = state.shards.ask_for(&id, UpdateProfile { id, caller: caller.0.user_id, if_match, update }).await?;
    Ok(tagged(HttpResponse::Ok(), &profile.vclock).json(profile))
}
