//! `GET /api/v1/recommendations/users`: the caller's most similar (or complementary)
//! users from the last finished recommendation run, with the features that made each
//! match. Results come from the caller's shard; this handler never computes anything and
//! never answers an error just because no run has finished yet.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::extract::Authenticated;
use crate::problem::{ApiError, Problem};
use crate::similarity::{Mode, SharedFeature};

/// The query string.
#[derive(Debug, Deserialize, IntoParams)]
pub struct RecommendationQuery {
    /// `similar` (default): users most like you; `complementary`: users whose skills match your interests.
    pub mode: Option<String>,
    /// How many users, 1 to the node's k (default: 10, or k if smaller).
    pub limit: Option<String>,
}

/// Whether results exist yet.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RecommendationState {
    /// A run has finished; `users` holds its results for you (possibly none).
    Ready,
    /// No recommendation run has finished on this node yet: `users` is empty and
    /// `computed_at` null. Ask again after the next run.
    NoRunYet,
}

/// One recommended user.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RecommendedUser {
    pub user_id: Uuid,
    /// As it was when the run computed the results.
    pub username: String,
    /// Cosine similarity, in (0, 1]; higher is closer.
    pub score: f64,
    /// The features you share that made the match, most telling first (in complementary
    /// mode: their skills that match your interests).
    pub shared_features: Vec<SharedFeature>,
}

/// `GET /recommendations/users` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Recommendations {
    pub mode: Mode,
    pub status: RecommendationState,
    /// What `status` means, for a person.
    pub explanation: String,
    /// When the run these results come from finished; null before the first run.
    pub computed_at: Option<DateTime<Utc>>,
    /// Best first.
    pub users: Vec<RecommendedUser>,
}

/// `mode` and `limit`, checked.
fn parse(query: &RecommendationQuery, k: usize) -> Result<(Mode, usize), ApiError> {
    let mode = match query.mode.as_deref() {
        None => Mode::Similar,
        Some(m) => Mode::parse(m)
            .ok_or_else(|| ApiError::BadRequest(format!("mode must be similar or complementary, not {m:?}")))?,
    };
    let limit = match query.limit.as_deref() {
        None => k.min(10),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=k).contains(l))
            .ok_or_else(|| ApiError::BadRequest(format!("limit must be a whole number from 1 to {k}")))?,
    };
    Ok((mode, limit))
}

/// Users to work with: the ones most like you, or the ones who can teach what you want to learn.
#[utoipa::path(get, path = "/api/v1/recommendations/users", tag = "recommendations", security(("bearer" = [])),
    params(RecommendationQuery),
    responses((status = 200, body = Recommendations, description = "Results of the last run; before any run, an empty list with status no_run_yet"),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 503, body = Problem)))]
pub async fn users(
    state: web::Data<AppState>,
    caller: Authenticated,
    query: web::Query<RecommendationQuery>,
) -> Result<HttpResponse, ApiError> {
    let (mode, limit) = parse(&query, state.recommend_k)?;
    let user_id = caller.0.user_id;
    let found = state.shards.recommendations_for(user_id, mode, limit).await?;
    let answer = match found {
        None => Recommendations {
            mode,
            status: RecommendationState::NoRunYet,
            explanation: "no recommendation run has finished on this node yet; results appear after the next run"
                .into(),
            computed_at: None,
            users: Vec::new(),
        },
        Some((run, rows)) => Recommendations {
            mode,
            status: RecommendationState::Ready,
            explanation: if rows.is_empty() {
                "the last run found nobody sharing your features in this mode (or you joined after it); \
                 add skills and interests to your profile"
                    .into()
            } else {
                format!("results of the run finished at {}", run.computed_at.to_rfc3339())
            },
            computed_at: Some(run.computed_at),
            users: rows
                .into_iter()
                .map(|r| RecommendedUser {
                    user_id: r.neighbour_id,
                    username: r.username,
                    score: r.score,
                    shared_features: r.shared,
                })
                .collect(),
        },
    };
    Ok(HttpResponse::Ok().json(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mode: Option<&str>, limit: Option<&str>, k: usize) -> Result<(Mode, usize), String> {
        let query = RecommendationQuery { mode: mode.map(Into::into), limit: limit.map(Into::into) };
        parse(&query, k).map_err(|e| e.to_string())
    }

    #[test]
    fn mode_and_limit_are_checked() {
        assert_eq!(check(None, None, 20), Ok((Mode::Similar, 10)));
        assert_eq!(check(None, None, 5), Ok((Mode::Similar, 5)));
        assert_eq!(check(Some("complementary"), Some("20"), 20), Ok((Mode::Complementary, 20)));
        for (mode, limit) in [(Some("best"), None), (None, Some("0")), (None, Some("21")), (None, Some("x"))] {
            assert!(check(mode, limit, 20).is_err(), "{mode:?} {limit:?}");
        }
        assert!(check(None, Some("-1"), 20).unwrap_err().contains("1 to 20"));
    }
}
