//! Replication: `/api/v1/sync/status` (peers, origins, what waits, open conflicts).

use actix_web::{HttpResponse, web};

use super::AppState;
use super::extract::Authenticated;
use crate::actors::sync::{GetSyncStatus, SyncStatus};
use crate::problem::{ApiError, Problem};

/// This node's replication: per peer the last reconciliation and the changes sent and
/// received; per origin node the writes held here; changes waiting for a dependency;
/// open conflicts.
#[utoipa::path(get, path = "/api/v1/sync/status", tag = "network", security(("bearer" = [])),
    responses((status = 200, body = SyncStatus), (status = 401, body = Problem)))]
pub async fn status(state: web::Data<AppState>, _caller: Authenticated) -> Result<HttpResponse, ApiError> {
    let report = state.sync.send(GetSyncStatus).await?;
    Ok(HttpResponse::Ok().json(report))
}
