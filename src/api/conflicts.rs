//! `/api/v1/conflicts`: concurrent edits of one field of the caller's own rows, found
//! while merging changes from other nodes — the value every node shows and the one that
//! lost, with their origins and times. Resolve one by writing the value you want (a
//! normal PUT with `If-Match`); it then shows as resolved.

use actix_web::{HttpResponse, web};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::extract::Authenticated;
use super::{AppState, bad};
use crate::actors::shard::{ConflictCursor, ConflictQuery, ListConflicts};
use crate::model::{ConflictPage, Entity};
use crate::problem::{ApiError, Problem};
use crate::validate;

/// Query of `GET /api/v1/conflicts`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConflictParams {
    /// Only conflicts on rows of this kind: `user`, `profile` or `project`.
    pub entity: Option<String>,
    /// Only conflicts on this row.
    pub id: Option<Uuid>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Conflicts on the caller's rows (open and resolved), oldest first.
#[utoipa::path(get, path = "/api/v1/conflicts", tag = "conflicts", security(("bearer" = [])), params(ConflictParams),
    responses((status = 200, body = ConflictPage), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 503, body = Problem)))]
pub async fn list(
    state: web::Data<AppState>,
    caller: Authenticated,
    params: web::Query<ConflictParams>,
) -> Result<HttpResponse, ApiError> {
    let ConflictParams { entity, id, limit, cursor } = params.into_inner();
    let owner = caller.0.user_id;
    let entity = entity
        .map(|e| Entity::parse(&e).ok_or_else(|| bad(format!("entity must be user, profile or project, not {e:?}"))))
        .transpose()?;
    let limit = validate::page_limit(limit).map_err(bad)?;
    let after = cursor.map(|c| decode_cursor(&c)).transpose()?;
    let query = ConflictQuery { owner, entity, row_id: id, after, limit: limit as i64 };
    let items = state.shards.ask_for(&owner, ListConflicts { query }).await?;
    let next_cursor = (items.len() == limit).then(|| items.last()).flatten().map(|c| {
        encode_cursor(&ConflictCursor {
            detected_at: c.detected_at,
            row_id: c.row_id,
            field: c.field.clone(),
            loser_node: c.loser.origin.clone(),
            loser_counter: c.loser.counter as i64,
        })
    });
    Ok(HttpResponse::Ok().json(ConflictPage { items, next_cursor }))
}

fn encode_cursor(c: &ConflictCursor) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode_cursor(text: &str) -> Result<ConflictCursor, ApiError> {
    let malformed = || bad("cursor is malformed; pass next_cursor from the previous page".into());
    let bytes = URL_SAFE_NO_PAD.decode(text.as_bytes()).map_err(|_| malformed())?;
    serde_json::from_slice(&bytes).map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = ConflictCursor {
            detected_at: crate::model::now(),
            row_id: Uuid::now_v7(),
            field: "name".into(),
            loser_node: "n1".into(),
            loser_counter: 3,
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        assert!(decode_cursor("not a cursor").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode(b"{}")).is_err());
    }
}
