//! `/api/v1/projects`: create, read, update, delete (creator only), list with cursors.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::extract::{Authenticated, if_match};
use super::{AppState, bad, tagged};
use crate::actors::shard::{CreateProject, DeleteProject, GetProject, ProjectQuery, UpdateProject};
use crate::actors::shards::Shards;
use crate::model::{NewProject, Project, ProjectPage, ProjectUpdate};
use crate::placement::new_owned_id;
use crate::problem::{ApiError, Problem};
use crate::validate::{self, limits};
use crate::vclock::VectorClock;

/// Checks and normalises a new project.
pub fn validated_new(new: NewProject) -> Result<NewProject, ApiError> {
    let NewProject { name, description, tags } = new;
    Ok(NewProject {
        name: validate::line("name", &name, 1, limits::PROJECT_NAME_MAX).map_err(bad)?,
        description: validate::text("description", &description, limits::DESCRIPTION_MAX).map_err(bad)?,
        tags: validate::labels("tags", &tags).map_err(bad)?,
    })
}

/// Checks and normalises an update; omitted fields stay omitted (kept).
pub fn validated_update(update: ProjectUpdate) -> Result<ProjectUpdate, ApiError> {
    let ProjectUpdate { name, description, tags } = update;
    if name.is_none() && description.is_none() && tags.is_none() {
        return Err(bad("give at least one of name, description, tags".into()));
    }
    Ok(ProjectUpdate {
        name: name.map(|n| validate::line("name", &n, 1, limits::PROJECT_NAME_MAX)).transpose().map_err(bad)?,
        description: description
            .map(|d| validate::text("description", &d, limits::DESCRIPTION_MAX))
            .transpose()
            .map_err(bad)?,
        tags: tags.map(|t| validate::labels("tags", &t)).transpose().map_err(bad)?,
    })
}

/// Create a project owned by the caller.
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", security(("bearer" = [])), request_body = NewProject,
    responses((status = 201, description = "Created; `Location` names the project", body = Project),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 503, body = Problem)))]
pub async fn create(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Json<NewProject>,
) -> Result<HttpResponse, ApiError> {
    let NewProject { name, description, tags } = validated_new(body.into_inner())?;
    let creator = caller.0.user_id;
    let now = crate::model::now();
    let project = Project {
        id: new_owned_id(&creator),
        creator_id: creator,
        name,
        description,
        tags,
        created_at: now,
        updated_at: now,
        vclock: VectorClock::new(),
    };
    let project = state.shards.ask_for(&creator, CreateProject { project }).await?;
    Ok(tagged(HttpResponse::Created(), &project.vclock)
        .insert_header(("Location", format!("/api/v1/projects/{}", project.id)))
        .json(project))
}

/// Read a project.
#[utoipa::path(get, path = "/api/v1/projects/{id}", tag = "projects", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id")),
    responses((status = 200, body = Project, headers(("ETag" = String))), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn get(
    state: web::Data<AppState>,
    _caller: Authenticated,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let project = state.shards.ask_for(&id, GetProject { id }).await?;
    Ok(tagged(HttpResponse::Ok(), &project.vclock).json(project))
}

/// Update a project you created. Omitted fields are kept.
#[utoipa::path(put, path = "/api/v1/projects/{id}", tag = "projects", security(("bearer" = [])), request_body = ProjectUpdate,
    params(("id" = Uuid, Path, description = "Project id"), ("If-Match" = Option<String>, Header, description = "ETag from a GET")),
    responses((status = 200, body = Project), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 412, body = Problem),
        (status = 503, body = Problem)))]
pub async fn update(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<Uuid>,
    req: HttpRequest,
    body: web::Json<ProjectUpdate>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let update = validated_update(body.into_inner())?;
    let if_match = if_match(&req)?;
    let project = state.shards.ask_for(&id, UpdateProject { id, caller: caller.0.user_id, if_match, update }).await?;
    Ok(tagged(HttpResponse::Ok(), &project.vclock).json(project))
}

/// Delete a project you created.
#[utoipa::path(delete, path = "/api/v1/projects/{id}", tag = "projects", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Project id"), ("If-Match" = Option<String>, Header, description = "ETag from a GET")),
    responses((status = 204, description = "Deleted"), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 412, body = Problem), (status = 503, body = Problem)))]
pub async fn delete(
    state: web::Data<AppState>,
    caller: Authenticated,
    id: web::Path<Uuid>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let if_match = if_match(&req)?;
    state.shards.ask_for(&id, DeleteProject { id, caller: caller.0.user_id, if_match }).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Query of `GET /projects`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Only projects of this creator.
    pub creator_id: Option<Uuid>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of live projects, newest first. Shared by the REST endpoint and the CLI.
pub async fn list_page(
    shards: &Shards,
    creator: Option<Uuid>,
    cursor: Option<String>,
    limit: Option<usize>,
) -> Result<ProjectPage, ApiError> {
    let query = page_query(creator, cursor, limit)?;
    let limit = query.limit;
    let items = shards.list_projects(query).await?;
    let next_cursor = (items.len() == limit).then(|| items.last().map(|p| p.id.to_string())).flatten();
    Ok(ProjectPage { items, next_cursor })
}

/// Checks a page request: the limit within bounds, the cursor a project id.
pub fn page_query(
    creator: Option<Uuid>,
    cursor: Option<String>,
    limit: Option<usize>,
) -> Result<ProjectQuery, ApiError> {
    let limit = validate::page_limit(limit).map_err(bad)?;
    let before = cursor
        .map(|c| {
            Uuid::parse_str(&c).map_err(|_| bad("cursor is malformed; pass next_cursor from the previous page".into()))
        })
        .transpose()?;
    Ok(ProjectQuery { creator, before, limit })
}

/// List projects, newest first, optionally of one creator.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects", security(("bearer" = [])), params(ListParams),
    responses((status = 200, body = ProjectPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 503, body = Problem)))]
pub async fn list(
    state: web::Data<AppState>,
    _caller: Authenticated,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let ListParams { creator_id, limit, cursor } = params.into_inner();
    Ok(HttpResponse::Ok().json(list_page(&state.shards, creator_id, cursor, limit).await?))
}
