//! Node status and health: `/api/v1/network/status`, `/healthz`, `/readyz`.

use actix_web::{HttpResponse, web};

use super::AppState;
use super::extract::Authenticated;
use crate::actors::shard::ShardState;
use crate::actors::supervisor::{GetStatus, StatusReport};
use crate::problem::{ApiError, Problem};

/// This node: id, version, uptime, shards and their health.
#[utoipa::path(get, path = "/api/v1/network/status", tag = "network", security(("bearer" = [])),
    responses((status = 200, body = StatusReport), (status = 401, body = Problem)))]
pub async fn status(state: web::Data<AppState>, _caller: Authenticated) -> Result<HttpResponse, ApiError> {
    let report = state.supervisor.send(GetStatus).await?;
    Ok(HttpResponse::Ok().json(report))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: every shard is reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Every shard is up"), (status = 503, body = Problem)))]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let health = state.shards.health().await;
    let down: Vec<String> = health.iter().filter(|h| h.state != ShardState::Up).map(|h| h.shard.to_string()).collect();
    if down.is_empty() {
        Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "shards": health })))
    } else {
        Err(ApiError::Unavailable(format!("shards not up: {}", down.join(", "))))
    }
}
